"""Thin entry points: `python -m tasks.<name> --help`."""
