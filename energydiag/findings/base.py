"""A finding: what is wrong, its evidence, and the remedy that fits. Rules never compute:
analyses hand them numbers, renderers only display what they return.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    code: str
    severity: str
    title: str
    remedy: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ranked(findings: list[Finding | None]) -> list[Finding]:
    """Drop the Nones; errors first, then warnings, then notes, each in the order found."""
    kept = [f for f in findings if f is not None]
    return sorted(kept, key=lambda f: SEVERITIES.index(f.severity))


def has_error(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def has_code(findings: list[Finding], code: str) -> bool:
    return any(f.code == code for f in findings)
