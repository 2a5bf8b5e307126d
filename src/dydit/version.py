"""The package version (also ``dydit.__version__``); pyproject.toml states the same number."""

__version__ = "0.1.0"
