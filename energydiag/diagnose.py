"""One-shot diagnosis of a run: the path a person would take, automated.

If the logged loss ever went non-finite, replay from the checkpoint before it and localise the
fault. Otherwise inspect the latest checkpoint that has a logged batch, and compare the loss at
the start and the end of the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from energydiag import findings as rules
from energydiag.curves import trend
from energydiag.inspect import inspect
from energydiag.layout import checkpoint_path
from energydiag.localise import Fault
from energydiag.replay import replay
from energydiag.run import Run


@dataclass
class Diagnosis:
    run: str
    verdict: str
    loss_start: float | None
    loss_end: float | None
    fault: Fault | None
    findings: list[rules.Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "verdict": self.verdict,
            "loss_start": self.loss_start,
            "loss_end": self.loss_end,
            "fault": self.fault.to_dict() if self.fault else None,
            "findings": [f.to_dict() for f in self.findings],
        }


def first_nonfinite_loss(losses: dict[int, float]) -> int | None:
    return next((s for s in sorted(losses) if not math.isfinite(losses[s])), None)


def diagnose(run: Run, device: torch.device | None = None) -> Diagnosis:
    losses = run.logged()
    start, end = trend(list(losses.values())) or (None, None)
    bad = first_nonfinite_loss(losses)
    if bad is not None:
        result = replay(run, max(bad - 1, 0), to_step=bad, device=device)
        verdict = "non-finite" if result.fault else "non-finite in the log, but finite on replay"
        return Diagnosis(str(run.root), verdict, start, end, result.fault, result.findings)
    inspected = run.checkpoints_with_batches
    found = []
    if inspected:
        found = inspect(checkpoint_path(run.root, inspected[-1]), run.root, device=device).findings
    verdict = "stalled" if rules.has_error(found) else "healthy"
    return Diagnosis(str(run.root), verdict, start, end, None, found)
