"""report stage of the harness (see docs/design.md)."""
