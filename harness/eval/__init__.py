"""eval stage of the harness (see DESIGN.md)."""
