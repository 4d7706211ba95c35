"""The live monitors over a log recorded without them: the earliest step each would have fired.

Each rule's ``first_fire`` is its online definition over the whole series, so a run recorded
before the monitors existed (or with them silenced) gets the same answer the Recorder would have
given, and the lead it would have had over the first non-finite value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from energydiag import findings as rules
from energydiag.io.metrics import metric_series
from energydiag.record.monitors import default_monitors
from energydiag.schema import Record

if TYPE_CHECKING:
    from energydiag.analyses.curves import CurveReport


@dataclass
class OfflineAlarm(Record):
    rule: str
    step: int | None  # None: it would not have fired
    column: str


def earliest_alarms(frame: pd.DataFrame) -> tuple[list[OfflineAlarm], list[str]]:
    """Each rule whose column the log holds, with its first firing step; and the rules whose
    column is missing (not checked, said so)."""
    checked, missing = [], []
    for monitor in default_monitors():
        if monitor.column not in frame:
            missing.append(monitor.name)
            continue
        step = monitor.first_fire(*metric_series(frame, monitor.column))
        checked.append(OfflineAlarm(monitor.name, step, monitor.column))
    return checked, missing


def with_alarms(report: CurveReport, frame: pd.DataFrame) -> CurveReport:
    """The curve report with the monitors' earliest firings and their finding."""
    report.alarms, report.alarms_unchecked = earliest_alarms(frame)
    found = rules.would_have_alarmed(
        [a.to_dict() for a in report.alarms], report.first_nonfinite, report.alarms_unchecked
    )
    if found is not None:
        report.findings = rules.ranked([*report.findings, found])
    return report
