"""Is this checkpoint healthy? The predicates bisect searches with, one checkpoint at a time.

nonfinite: a NaN/Inf tensor. exploded: a layer's max|w| grown ×1e3 past the first good
checkpoint (the reference, read once), or beyond 1e4 without one. loss: a non-finite loss on the
checkpoint's own batch. any: all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from energydiag.analyses.checkpoint_stats import EXPLODED_ABS, CheckpointStats, checkpoint_stats
from energydiag.analyses.timeline import GROWTH_LIMIT, growth
from energydiag.engine.probe import Probe
from energydiag.errors import DiagError, OptionError, first_line
from energydiag.io.rundir import Run, load_checkpoint_file
from energydiag.io.torchfiles import open_reader

GOOD, BAD, UNREADABLE = "good", "bad", "unreadable"
PREDICATES = ("any", "nonfinite", "exploded", "loss")


@dataclass
class Evaluation:
    step: int
    status: str
    reason: str


class Judge:
    """Evaluates one checkpoint by the predicate, streaming its tensors."""

    def __init__(
        self,
        paths: dict[int, Path],
        predicate: str,
        run: Run | None = None,
        device: torch.device | None = None,
    ) -> None:
        if predicate not in PREDICATES:
            raise OptionError(
                f"choose one of {', '.join(PREDICATES)}", "predicate", value=repr(predicate)
            )
        self.paths, self.predicate, self.run = paths, predicate, run
        self.device = device or torch.device("cpu")
        self.reference: CheckpointStats | None = None
        self._probe: Probe | None = None

    def __call__(self, step: int) -> Evaluation:
        try:
            with open_reader(self.paths[step]) as reader:
                stats = checkpoint_stats(reader)
            _check_step(self.paths[step], stats.metadata, step)
        except DiagError as err:
            return Evaluation(step, UNREADABLE, err.problem)
        bad = [t.name for t in stats.tensors if t.nonfinite]
        if bad:
            return Evaluation(step, BAD, f"{len(bad)} non-finite tensor(s), e.g. {bad[0]}")
        if self.predicate in ("any", "exploded"):
            verdict = self._explosion(step, stats)
            if verdict:
                return verdict
        if self.predicate in ("any", "loss") and self._has_batch(step):
            return self._loss_verdict(step)
        return Evaluation(step, GOOD, f"all tensors finite, max|w| {_peak(stats):.3g}")

    def _explosion(self, step: int, stats: CheckpointStats) -> Evaluation | None:
        if self.reference is None:
            exploded = stats.exploded(EXPLODED_ABS)
            if exploded:
                worst = max(exploded, key=lambda r: r["max_abs"])
                return Evaluation(
                    step, BAD, f"exploded: {worst['layer']} max|w| {worst['max_abs']:.3g}"
                )
            self.reference = stats
            return None
        factor, layer = growth(stats.model_layers(), self.reference.model_layers())
        if factor >= GROWTH_LIMIT:
            return Evaluation(
                step, BAD, f"exploded: {layer} grew ×{factor:.3g} since the first good checkpoint"
            )
        return None

    def _has_batch(self, step: int) -> bool:
        return self.run is not None and step in set(self.run.batch_steps)

    def _loss_verdict(self, step: int) -> Evaluation:
        m = self.run.manifest
        if self._probe is None:
            self._probe = Probe(
                m.model, self.device, self.run.manifest_path, m.loss, m.autocast_dtype
            )
        self._probe.load(load_checkpoint_file(self.paths[step]))
        batch = self.run.batch(step)  # a damaged batch is bad input, not a bad checkpoint
        try:
            loss, _ = self._probe.loss(batch)
        except Exception as err:
            return Evaluation(step, BAD, f"the loss on its batch raised {first_line(err)}")
        value = float(loss)
        if not math.isfinite(value):
            return Evaluation(
                step, BAD, f"tensors finite, but the loss on its own batch is {value}"
            )
        return Evaluation(step, GOOD, f"tensors finite, loss on its own batch {value:.4g}")


def _peak(stats: CheckpointStats) -> float:
    return max((r["max_abs"] for r in stats.model_layers().values()), default=math.nan)


def _check_step(path: Path, meta: dict[str, str], step: int) -> None:
    said = meta.get("step")
    if said is not None and said != str(step):
        raise DiagError(path, f"metadata says step {said!r}, its name says {step}")
