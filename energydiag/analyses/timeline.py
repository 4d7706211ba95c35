"""Checkpoints over time: how large each layer is, how fast it grows, and when it blew up.

Most real failures are finite first: an lr or gradient event multiplies the weights by 1e20 and
the NaN appears steps later somewhere else. Per checkpoint and per layer this measures max|w|
and RMS, their growth against the first and the previous checkpoint, and the update-to-weight
ratio between consecutive checkpoints. It streams: at most one tensor of two checkpoints is in
memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from energydiag import findings as rules
from energydiag.analyses.checkpoint_stats import CheckpointStats, checkpoint_stats
from energydiag.analyses.early_warning import OfflineAlarm, checkpoint_alarm
from energydiag.engine.tensorstats import summarize
from energydiag.errors import DiagError
from energydiag.io.torchfiles import open_reader
from energydiag.schema import Record, Report, report

GROWTH_LIMIT = 1e3  # a layer whose max|w| grew this much since the first checkpoint exploded


@dataclass
class TimelineRow(Record):
    derived = ("exploded", "state")

    step: int
    max_abs: float
    rms: float
    nonfinite: int
    worst_layer: str
    growth_since_first: float
    growth_since_previous: float
    update_ratio: float | None
    square_overflows_fp32: bool
    adam_max_ratio: float | None
    readable: bool = True
    problem: str | None = None

    @property
    def exploded(self) -> bool:
        return self.readable and self.growth_since_first >= GROWTH_LIMIT

    @property
    def state(self) -> str:
        """One word per checkpoint, worst first: a NaN checkpoint is never merely 'not exploded'."""
        if not self.readable:
            return "unreadable"
        if self.nonfinite:
            return "non-finite"
        return "exploded" if self.exploded else "ok"


@report("timeline")
@dataclass
class Timeline(Report):
    rows: list[TimelineRow]
    layers: dict[str, list[float | None]]  # layer -> max|w| per row (None: not readable)
    layer_l2: dict[str, list[float | None]] = field(default_factory=dict)
    # Per layer, the L2 norm of the optimizer's gradient average (Adam's exp_avg, SGD's
    # momentum_buffer): the only gradient a checkpoint holds, smoothed over recent steps.
    layer_grad: dict[str, list[float | None]] = field(default_factory=dict)
    findings: list[rules.Finding] = field(default_factory=list)
    alarm: OfflineAlarm | None = None  # where the live weight_growth rule would have fired

    def worst(self) -> TimelineRow | None:
        """The checkpoint to judge a run by: its first non-finite one, else its most grown one
        (not simply the latest, which after a blow-up holds no finite layer to measure)."""
        readable = [r for r in self.rows if r.readable]
        broken = next((r for r in readable if r.nonfinite), None)
        return broken or max(readable, key=lambda r: r.growth_since_first, default=None)

    def healthy(self, steps: list[int]) -> list[int]:
        """Those of ``steps`` whose checkpoint is finite and not exploded."""
        ok = {r.step for r in self.rows if r.state == "ok"}
        return [s for s in steps if s in ok]

    def exploded_layers(self) -> list[int]:
        """Per checkpoint, how many layers grew ×GROWTH_LIMIT or more since the first one."""
        counts = [0] * len(self.rows)
        for series in self.layers.values():
            first = series[0] if series else None
            if first is None or not math.isfinite(first) or first <= 0:
                continue  # as growth(): a layer that started at zero has no ratio
            for i, value in enumerate(series):
                counts[i] += (
                    value is not None and math.isfinite(value) and value / first >= GROWTH_LIMIT
                )
        return counts


def growth(now: dict[str, dict], then: dict[str, dict]) -> tuple[float, str]:
    """The largest max|w| ratio of a layer between two checkpoints, and which layer."""
    worst, layer = 1.0, ""
    for name, row in now.items():
        before = then.get(name, {}).get("max_abs", math.nan)
        if math.isfinite(row["max_abs"]) and math.isfinite(before) and before > 0:
            ratio = row["max_abs"] / before
            if ratio > worst:
                worst, layer = ratio, name
    return worst, layer


def update_ratio(path: Path, previous: Path) -> float | None:
    """||w_now - w_before|| / ||w_before|| over every model tensor both files share."""
    with open_reader(path) as now, open_reader(previous) as before:
        shared = [
            n for n in now.names if n in set(before.names) and not n.startswith(("optim.", "rng."))
        ]
        num = den = 0.0
        for name in shared:
            a, b = now.get(name), before.get(name)
            if not a.is_floating_point() or a.shape != b.shape:
                continue
            num = math.hypot(num, summarize(a.double() - b.double()).l2)
            den = math.hypot(den, summarize(b).l2)
    return num / den if den > 0 and math.isfinite(num) else None


def timeline(
    checkpoints: dict[int, Path],
    autocast_dtype: str | None = None,
    progress: Callable[[int], None] | None = None,
    monitored: bool = False,
) -> Timeline:
    """``monitored``: the run was recorded with the live monitors (it has their alarms)."""
    if not checkpoints:
        raise DiagError(None, "no checkpoints to put on a timeline")
    rows, per_row, first, previous = [], [], None, None
    for step, path in sorted(checkpoints.items()):
        if progress:
            progress(step)
        try:
            with open_reader(path) as reader:
                stats = checkpoint_stats(reader, autocast_dtype)
        except DiagError as err:
            rows.append(_unreadable(step, err.problem))
            per_row.append({})
            continue
        first = first or stats
        row = _row(step, stats, first, previous)
        row.update_ratio = update_ratio(path, Path(previous.path)) if previous else None
        rows.append(row)
        per_row.append(_layer_columns(stats))
        previous = stats
    result = Timeline(
        rows, *(_by_layer([r.get(c, {}) for r in per_row]) for c in ("max_abs", "l2", "grad"))
    )
    readable = [r for r in rows if r.readable and math.isfinite(r.max_abs)]
    result.alarm = checkpoint_alarm([r.step for r in readable], [r.max_abs for r in readable])
    broken = [asdict(r) for r in rows if r.state == "non-finite"]
    result.findings = rules.ranked(
        [
            rules.timeline_exploded([asdict(r) for r in rows if r.exploded], GROWTH_LIMIT),
            rules.timeline_nonfinite(broken),
            rules.growth_alarm(result.alarm.step, broken[0]["step"] if broken else None, monitored),
        ]
    )
    return result


GRADIENT_AVERAGES = (" exp_avg", " momentum_buffer")


def _layer_columns(stats: CheckpointStats) -> dict[str, dict[str, float]]:
    model = stats.model_layers().items()
    grads = {
        r["layer"].rsplit(" ", 1)[0]: r["l2"]
        for r in stats.layers
        if r["group"] == "optimizer" and r["layer"].endswith(GRADIENT_AVERAGES)
    }
    return {
        "max_abs": {k: v["max_abs"] for k, v in model},
        "l2": {k: v["l2"] for k, v in model},
        "grad": grads,
    }


def _by_layer(rows: list[dict[str, float]]) -> dict[str, list[float | None]]:
    names = sorted({name for row in rows for name in row})
    return {n: [row.get(n) for row in rows] for n in names}


def _row(
    step: int, stats: CheckpointStats, first: CheckpointStats, previous: CheckpointStats | None
) -> TimelineRow:
    model = stats.model_layers()
    since_first, worst = growth(model, first.model_layers())
    since_prev, _ = growth(model, previous.model_layers()) if previous else (1.0, "")
    finite = [r for r in model.values() if math.isfinite(r["max_abs"])]
    numel = sum(r["numel"] for r in finite)
    l2 = math.hypot(*(r["l2"] for r in finite)) if finite else math.nan
    return TimelineRow(
        step=step,
        max_abs=max((r["max_abs"] for r in finite), default=math.nan),
        rms=l2 / math.sqrt(numel) if numel else math.nan,
        nonfinite=sum(t.nonfinite for t in stats.tensors),
        worst_layer=worst,
        growth_since_first=since_first,
        growth_since_previous=since_prev,
        update_ratio=None,
        square_overflows_fp32=any(r["square_overflows_fp32"] for r in model.values()),
        adam_max_ratio=max((a["max_ratio"] for a in stats.adam), default=None),
    )


def _unreadable(step: int, problem: str) -> TimelineRow:
    nan = math.nan
    return TimelineRow(step, nan, nan, 0, "", nan, nan, None, False, None, False, problem)
