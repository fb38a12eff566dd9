"""align stage of the harness (see DESIGN.md)."""
