"""The one exception type that reaches the user as a single line and exit code 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def blame(path: str | Path) -> Iterator[None]:
    """Errors that name no file are about ``path``: a factory that rejects its kwargs is a
    problem of the run.json that gave them."""
    try:
        yield
    except DiagError as err:
        if err.path is None:
            raise DiagError(path, err.problem) from None
        raise


def first_line(err: BaseException) -> str:
    """'Type: first line of the message', for one-line reports of someone else's exception."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
