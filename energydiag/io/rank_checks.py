"""``ranks.jsonl``: rank 0's comparison of the ranks' parameter fingerprints, every few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from energydiag.errors import DiagError

_FIELDS = {"step": int, "equal": bool, "ranks": list, "max_relative": (int, float), "layers": dict}


def read_rank_checks(path: Path) -> list[dict[str, Any]]:
    """Every comparison, in step order; [] when the run has none (one process, or FSDP)."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            rows.append(_row(path, number, line))
    return sorted(rows, key=lambda r: r["step"])


def _row(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DiagError(path, f"line {number} is not JSON ({err.msg})") from None
    bad = [
        key
        for key, kind in _FIELDS.items()
        if not isinstance(row, dict) or not isinstance(row.get(key), kind)
    ]
    if bad or isinstance(row["step"], bool) or not _relative(row["max_relative"]):
        raise DiagError(path, f"line {number}: missing or mistyped {', '.join(bad) or 'values'}")
    return row


def _relative(value: float) -> bool:
    return not isinstance(value, bool) and (value >= 0 or math.isnan(value))
