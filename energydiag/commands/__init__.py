"""One module per command: its ``run`` does the work and returns an :class:`Outcome`.

The CLI parses options into ``run``'s arguments and renders the outcome's report (console, JSON,
CI files); a Python caller gets the same typed report and the same exit code the command line
would end with. Errors name options by their argument names; only the CLI spells them as flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from energydiag.errors import OptionError
from energydiag.exitcodes import ExitCode
from energydiag.schema import Report

R = TypeVar("R", bound=Report)


@dataclass(frozen=True)
class Outcome(Generic[R]):
    report: R
    code: ExitCode


def step_span(text: str, option: str) -> tuple[int, int]:
    """``N..M``, both included, or ``N`` alone; that N <= M is the caller's to hold."""
    first, dots, last = text.partition("..")
    if not (first.isdigit() and (last.isdigit() or not dots)):
        raise OptionError("use N or N..M with N <= M, both steps", option, value=repr(text))
    return int(first), int(last or first)
