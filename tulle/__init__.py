"""Tulle: a small service mesh in Python. See DESIGN.md (../shared) for the fixed names."""

__version__ = "0.1.0"
