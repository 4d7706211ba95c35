"""Importing this registers every command on the app."""

from energydiag.cli import files, gates, landscape, runs  # noqa: F401
