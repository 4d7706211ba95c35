"""The command line: ``energydiag.cli:main``. See energydiag.cli.app."""

from energydiag.cli import commands  # noqa: F401  (registers the commands)
from energydiag.cli.app import app, legacy_check_json, main

__all__ = ["app", "legacy_check_json", "main"]
