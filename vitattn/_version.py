"""The package version (single source: pyproject reads it too)."""

__version__ = "0.2.0"
