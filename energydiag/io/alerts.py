"""``alerts.jsonl``: the live monitors' alarms as the Recorder wrote them, read back validated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from energydiag.errors import DiagError
from energydiag.io.layout import ALERTS


def read_alerts(root: Path) -> list[dict[str, Any]]:
    """Every alarm of the run, in order; empty when it raised none (or had no monitors)."""
    path = root / ALERTS
    if not path.is_file():
        return []
    alarms = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            alarms.append(_alarm(path, number, line))
    return alarms


def _alarm(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        alarm = json.loads(line)
    except json.JSONDecodeError as err:
        raise DiagError(path, f"line {number} is not JSON ({err.msg})") from None
    valid = (
        isinstance(alarm, dict)
        and isinstance(alarm.get("step"), int)
        and isinstance(alarm.get("rule"), str)
        and isinstance(alarm.get("message"), str)
    )
    forecast = alarm.get("forecast") if isinstance(alarm, dict) else None
    if forecast is not None and not (
        isinstance(forecast, dict) and isinstance(forecast.get("steps_to_overflow"), int | float)
    ):
        valid = False
    if not valid:
        raise DiagError(path, f"line {number} is not an alarm (step, rule, message, forecast)")
    return alarm
