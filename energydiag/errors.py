"""The one exception type that reaches the user as a single line and exit code 2."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


class OptionError(DiagError):
    """An option's value cannot be used, or a needed option is missing.

    Options are named by their field names (``to_step``), never by a command line's spelling:
    ``str(err)`` reads as the Python API's arguments, and the CLI spells them as its flags
    through ``render``.
    """

    def __init__(
        self, problem: str, *options: str, value: object = None, path: str | Path | None = None
    ) -> None:
        self.options, self.value, self.bare_problem = options, value, problem
        super().__init__(path, self._said(lambda name: name))

    def render(self, spell: Callable[[str], str]) -> str:
        """The one line, with each option spelled by ``spell`` (the CLI passes its flags)."""
        said = self._said(spell)
        return f"{self.path}: {said}" if self.path else said

    def _said(self, spell: Callable[[str], str]) -> str:
        names = [spell(o) for o in self.options]
        if self.value is not None:
            return f"{names[0]} {self.value}: {self.bare_problem}"
        return f"{self.bare_problem} ({' or '.join(names)})" if names else self.bare_problem


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
