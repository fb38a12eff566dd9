"""Regression gates: limits from an experiment's `[gates]` table checked against results.json,
each as its own pytest test. `limits.py` reads and evaluates them (plain functions);
`plugin.py` is the pytest plugin (entry point `pytest11`). How to use them: docs/gates.md.
"""
