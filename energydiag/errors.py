"""The one exception type that reaches the user as a single line and exit code 2."""

from __future__ import annotations

from pathlib import Path


class DiagError(Exception):
    """Bad input: a file that is missing, corrupt, mis-shaped or inconsistent.

    The CLI prints ``str(err)`` on one line and exits with code 2; it never shows a traceback,
    so the message must name the file and say what is wrong with it.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
