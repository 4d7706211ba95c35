"""The command line: ``energydiag.cli:main``. The commands live in runs, files and gates and are
listed in table; their options in options; what they share (exit codes, one-line errors,
progress, JSON) in base.

``main`` imports everything inside its own handler, so Ctrl-C during start-up is a one-line
"interrupted" and exit 130, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Any


def main() -> None:
    try:
        from energydiag.cli.base import run

        code = run(sys.argv[1:])
    except KeyboardInterrupt:
        sys.stderr.write("energydiag: interrupted\n")
        code = 130
    raise SystemExit(code)


def __getattr__(name: str) -> Any:
    """``app`` (the Typer application, commands registered) and ``legacy_check_json``."""
    if name in ("app", "legacy_check_json"):
        from energydiag.cli import base

        base.register()
        return getattr(base, name)
    raise AttributeError(f"module 'energydiag.cli' has no attribute {name!r}")
