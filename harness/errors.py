"""The one exception type for mistakes the user can fix (bad paths, mismatched inputs).

The CLI prints such an error as a single line and exits non-zero; anything else is a bug and
keeps its traceback (with --debug).
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""
