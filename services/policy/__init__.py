"""The policy service (DESIGN.md)."""
