"""How a command ends, as a number a CI job can branch on."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # nothing wrong (a healthy run with warnings, or one not fully checked, included)
    FOUND = 1  # something is wrong with the run: a fault, an error finding, a failed check
    BAD_INPUT = 2  # a file, an option or a run that cannot be used, named in one line
    INTERNAL = 3  # a bug of ours
    INTERRUPTED = 130

    @classmethod
    def found_if(cls, wrong: bool) -> ExitCode:
        return cls.FOUND if wrong else cls.OK
