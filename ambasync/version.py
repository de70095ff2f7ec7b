"""The one definition of ambasync's version (pyproject reads it; outputs and methods texts name it)."""

__version__ = "0.1.0"
