"""A finding: what is wrong, its evidence, and the remedy that fits. Rules never compute:
analyses hand them numbers, renderers only display what they return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from energydiag.schema import Record

SEVERITIES = ("error", "warning", "info")


@dataclass
class Invocation(Record):
    """A command that takes the remedy further. Options go by their argument names (``from_step``),
    as commands take them; the renderers spell them as flags."""

    command: str
    target: str = "RUN"  # the positional argument, or its placeholder
    options: dict[str, Any] = field(default_factory=dict)  # True: a switch given alone


@dataclass
class Finding(Record):
    code: str
    severity: str
    title: str
    remedy: str
    evidence: dict[str, Any] = field(default_factory=dict)
    commands: list[Invocation] = field(default_factory=list)

    @property
    def family(self) -> str:
        """A code is ``family.name`` (``contrastive.few_negatives``): the rules module's family."""
        return self.code.partition(".")[0]


def ranked(findings: list[Finding | None]) -> list[Finding]:
    """Drop the Nones; errors first, then warnings, then notes, each in the order found."""
    kept = [f for f in findings if f is not None]
    return sorted(kept, key=lambda f: SEVERITIES.index(f.severity))


def has_error(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def has_code(findings: list[Finding], code: str) -> bool:
    return any(f.code == code for f in findings)
