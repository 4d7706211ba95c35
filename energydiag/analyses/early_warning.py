"""The live monitors over a log recorded without them: the earliest step each would have fired.

Each rule's ``first_fire`` is its online definition over the whole series, so a run recorded
before the monitors existed (or with them silenced) gets the same answer the Recorder would have
given, and the lead it would have had over the first non-finite value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from energydiag import findings as rules
from energydiag.io.metrics import metric_series
from energydiag.record.monitors import WeightGrowth, default_monitors
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
        if any(column not in frame for column in monitor.columns):
            missing.append(monitor.name)
            continue
        step = monitor.first_fire(*aligned(frame, monitor.columns, monitor.optional))
        checked.append(OfflineAlarm(monitor.name, step, monitor.columns[0]))
    return checked, missing


def aligned(
    frame: pd.DataFrame, columns: tuple[str, ...], optional: tuple[str, ...]
) -> tuple[np.ndarray, ...]:
    """Steps and one array per column, on the steps where every required column was logged;
    an optional column is NaN where it was not (or is not in the log at all)."""
    present = frame[list(columns)].notna().all(axis=1).to_numpy()
    rows = frame if present.all() else frame[present]  # a long log's usual case: no copy
    values = [metric_series(rows, c)[1] for c in columns]
    extra = [
        pd.to_numeric(rows[c], errors="coerce").to_numpy(dtype=np.float64)
        if c in rows
        else np.full(len(rows), np.nan)
        for c in optional
    ]
    return (rows["step"].to_numpy(dtype=np.int64), *values, *extra)


def checkpoint_alarm(steps: list[int], max_abs: list[float]) -> OfflineAlarm:
    """``weight_growth`` over checkpoints, each against the one before it (its growth per step
    over the gap). The other rules need a per-step log: ``curves`` applies them."""
    monitor = WeightGrowth(window=1)
    step = monitor.first_fire(np.asarray(steps, dtype=np.int64), np.asarray(max_abs, dtype=float))
    return OfflineAlarm(monitor.name, step, "max_abs")


def with_alarms(report: CurveReport, frame: pd.DataFrame) -> CurveReport:
    """The curve report with the monitors' earliest firings and their finding."""
    report.alarms, report.alarms_unchecked = earliest_alarms(frame)
    found = rules.would_have_alarmed(
        [a.to_dict() for a in report.alarms], report.first_nonfinite, report.alarms_unchecked
    )
    if found is not None:
        report.findings = rules.ranked([*report.findings, found])
    return report
