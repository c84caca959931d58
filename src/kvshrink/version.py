"""The package version (one place: the package, records and saved files read it here)."""
__version__ = "0.1.0"
