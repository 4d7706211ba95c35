"""What is in one checkpoint, streamed: statistics, and the findings they support (non-finite
values, exploded-but-finite layers, growth against the run's first checkpoint, RMS outliers,
Adam blow-up risk, values beyond the autocast dtype, an eps the parameter dtype cannot hold).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from energydiag import findings as rules
from energydiag.analyses.checkpoint_stats import (
    ADAM_RATIO_LIMIT,
    EXPLODED_ABS,
    CheckpointStats,
    TensorStats,
    adam_eps,
    checkpoint_stats,
)
from energydiag.analyses.timeline import GROWTH_LIMIT, growth
from energydiag.io.formats import Format, sniff
from energydiag.io.layout import parse_step
from energydiag.io.rundir import step_in_name
from energydiag.io.torchfiles import open_reader
from energydiag.schema import Record

NORM_OUTLIER = 100.0


@dataclass
class CheckpointReport(Record):
    flattened = ("stats",)

    stats: CheckpointStats
    step: int | None
    history: dict[str, Any] | None = None
    findings: list[rules.Finding] = field(default_factory=list)

    @property
    def tensors(self) -> list[TensorStats]:
        return self.stats.tensors


def step_of(path: Path, metadata: dict[str, str]) -> int | None:
    """The step a checkpoint holds: its metadata (read with its tensors, not opened again), else
    the last number in its file name."""
    step = parse_step(metadata.get("step")) if sniff(path) is Format.SAFETENSORS else None
    return step if step is not None else step_in_name(path)


def checkpoint_report(
    path: Path,
    autocast_dtype: str | None = None,
    first: Path | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> CheckpointReport:
    with open_reader(path) as reader:
        stats = checkpoint_stats(reader, autocast_dtype, progress)
    report = CheckpointReport(stats, step_of(path, stats.metadata))
    if first is not None and Path(first).resolve() != Path(path).resolve():
        with open_reader(first) as reader:
            reference = checkpoint_stats(reader)
        factor, layer = growth(stats.model_layers(), reference.model_layers())
        report.history = {"first": str(first), "growth": factor, "layer": layer}
    report.findings = rules.ranked(
        [
            rules.nonfinite_tensors([asdict(t) for t in stats.tensors if t.nonfinite]),
            rules.checkpoint_exploded(stats.exploded(EXPLODED_ABS), EXPLODED_ABS),
            rules.grown_since_first(report.history, GROWTH_LIMIT),
            rules.norm_outliers(_norm_outliers(stats.tensors)),
            rules.adam_blowup_risk(stats.adam, ADAM_RATIO_LIMIT),
            rules.eps_vanishes(adam_eps(stats.metadata), _eps_lost_in(stats)),
            rules.beyond_autocast_range(
                [asdict(t) for t in stats.tensors if t.beyond_autocast_range], autocast_dtype
            ),
        ]
    )
    return report


def _norm_outliers(tensors: list[TensorStats]) -> list[dict[str, Any]]:
    """Parameters whose RMS is ≥100× (or ≤1/100 of) the median of same-role parameters."""
    peers: dict[str, list[TensorStats]] = {}
    for t in tensors:
        if t.group == "model" and t.numel > 1 and math.isfinite(t.rms):
            peers.setdefault(t.name.rsplit(".", 1)[-1], []).append(t)
    outliers = []
    for role, items in peers.items():
        if len(items) < 3:
            continue
        median = sorted(t.rms for t in items)[len(items) // 2]
        for t in items:
            ratio = t.rms / median if median else math.inf
            if ratio >= NORM_OUTLIER or 0 < ratio <= 1 / NORM_OUTLIER:
                outliers.append(
                    {
                        "tensor": t.name,
                        "rms": t.rms,
                        "peer_median_rms": median,
                        "ratio": ratio,
                        "role": role,
                    }
                )
    return outliers


def _eps_lost_in(stats: CheckpointStats) -> list[str]:
    """The half-precision parameter dtypes in which Adam's eps rounds to 0."""
    if not stats.adam:
        return []
    eps = adam_eps(stats.metadata)
    halves = {t.dtype for t in stats.tensors if t.group == "model"} & {"float16", "bfloat16"}
    return sorted(d for d in halves if float(torch.tensor(eps, dtype=getattr(torch, d))) == 0.0)
