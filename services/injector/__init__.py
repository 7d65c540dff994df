"""The injector service (DESIGN.md)."""
