"""The evidence about one run, gathered once, so that every command tells the same story.

``diagnose``, ``report`` and ``check`` used to judge the weights and pick a checkpoint to inspect
each in its own way: one read the latest checkpoint (all NaN after a blow-up, so "growth 1"),
another the latest with a batch (energies all NaN, tanh "100% saturated"). A Case holds the
checkpoint timeline, the checkpoint the run is judged by, the last healthy checkpoint that has a
batch and its inspection, and the hyperparameter trajectory; the commands render views of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from energydiag import findings as rules
from energydiag.analyses.curves import CurveReport, analyse
from energydiag.analyses.early_warning import with_alarms
from energydiag.analyses.inspection import InspectReport, inspect
from energydiag.analyses.offsets import offset_trend
from energydiag.analyses.run_curves import run_bounds, with_ranks
from energydiag.analyses.schedule import ScheduleEvidence, schedule_causes, schedule_evidence
from energydiag.analyses.timeline import Timeline, timeline
from energydiag.errors import DiagError
from energydiag.io.alerts import read_alerts
from energydiag.io.layout import checkpoint_path
from energydiag.io.rundir import Run

MIN_CURVE_POINTS = 5


@dataclass
class Case:
    run: Run
    device: torch.device | None = None
    notes: list[str] = field(default_factory=list)

    @cached_property
    def timeline(self) -> Timeline | None:
        """Every checkpoint, streamed once; None with fewer than two (nothing to compare)."""
        paths = self.run.checkpoint_paths()
        if len(paths) < 2:
            return None
        monitored = bool(self.alerts)
        return timeline(paths, self.run.manifest.autocast_dtype, monitored=monitored)

    @cached_property
    def alerts(self) -> list[dict]:
        """The live monitors' alarms as the Recorder wrote them (none: not monitored, or quiet)."""
        return read_alerts(self.run.root)

    @cached_property
    def inspected_step(self) -> int | None:
        """The last checkpoint with a logged batch that is still healthy: finite, not exploded,
        and not after the log's first non-finite step. A broken one when no other has a batch."""
        failed = self.run.first_failure()
        usable = [s for s in self.run.checkpoints_with_batches if failed is None or s <= failed]
        if not usable:
            return None
        healthy = self.timeline.healthy(usable) if self.timeline else usable
        if not healthy:
            self.notes.append(f"no healthy checkpoint has a batch: inspected {usable[-1]}")
        return (healthy or usable)[-1]

    @cached_property
    def inspection(self) -> InspectReport | None:
        step = self.inspected_step
        if step is None:
            return None
        return inspect(checkpoint_path(self.run.root, step), self.run.root, device=self.device)

    @cached_property
    def curve(self) -> CurveReport | None:
        """The loss curve against the run's bounds (chance, floor); None with too few points."""
        losses = self.run.logged()
        if sum(math.isfinite(v) for v in losses.values()) < MIN_CURVE_POINTS:
            return None
        try:
            bounds = run_bounds(self.run)
        except DiagError as err:  # the model cannot be built here: the curve alone, said so
            self.notes.append(f"curve bounds: {err}")
            bounds = None
        frame = self.run.metrics()
        return with_ranks(with_alarms(analyse(frame, "loss", bounds=bounds), frame), self.run)

    @cached_property
    def schedule(self) -> ScheduleEvidence:
        return schedule_evidence(self.run)

    @cached_property
    def offsets(self) -> dict:
        """The energies' common offset over the checkpoints that have a batch."""
        return offset_trend(self.run, self.device)

    def schedule_causes(self) -> list[rules.Finding]:
        """The recorded lr trajectory's causes: a jump, past its configured value, 1 − lr·wd."""
        return schedule_causes(self.schedule)
