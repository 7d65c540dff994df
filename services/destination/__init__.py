"""The destination service (DESIGN.md)."""
