"""The ``oodforge`` command line: parses, calls the library, prints."""

from oodforge.cli.main import app

__all__ = ["app"]
