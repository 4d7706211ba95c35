"""Hyperparameters over steps: the schedule a run actually used, and its abrupt changes.

The Recorder stores each step's param-group settings with its batch; checkpoints hold the
settings of their moment. A learning rate that jumps by orders of magnitude between two steps
(a warm-up divided by zero, a scheduler stepped a million times) is a cause, not a symptom.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from energydiag import findings as rules
from energydiag.errors import DiagError
from energydiag.io.rundir import Run

JUMP_FACTOR = 10.0  # a change by this factor or more in one step is abrupt
# The direction that makes updates larger: lr up, Adam's eps down. A step decay is not a spike.
WATCHED = {"lr": +1, "eps": -1}


@dataclass
class Jump:
    step: int
    previous_step: int
    group: int
    key: str
    before: float
    after: float

    @property
    def factor(self) -> float:
        if self.before == 0:
            return math.inf
        return abs(self.after / self.before) if math.isfinite(self.after) else math.inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"factor": self.factor}


def history(run: Run, start: int | None = None, stop: int | None = None) -> dict[int, list]:
    """step -> param groups, from batches (every step) or else checkpoints, within the range."""
    steps = sorted(set(run.batch_steps) | set(run.checkpoint_steps))
    kept = [s for s in steps if (start is None or s >= start) and (stop is None or s <= stop)]
    recorded = {s: run.hyperparameters(s) for s in kept}
    return {s: g for s, g in recorded.items() if g is not None}


def jumps(recorded: dict[int, list], factor: float = JUMP_FACTOR) -> list[Jump]:
    """Consecutive recorded steps whose watched setting changed by ``factor`` or more."""
    found = []
    steps = sorted(recorded)
    for prev, step in zip(steps, steps[1:], strict=False):
        for index, (a, b) in enumerate(zip(recorded[prev], recorded[step], strict=False)):
            for key, direction in WATCHED.items():
                before, after = a.get(key), b.get(key)
                if _number(before) and _number(after) and _abrupt(before, after, factor, direction):
                    found.append(Jump(step, prev, index, key, float(before), float(after)))
    return found


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _abrupt(before: float, after: float, factor: float, direction: int) -> bool:
    if not math.isfinite(after) or not math.isfinite(before):
        return math.isfinite(before) and not math.isfinite(after)
    if before == 0 or after == 0:
        return False  # a warm-up starting from 0 is not a spike
    ratio = abs(after / before)
    return ratio >= factor if direction > 0 else ratio <= 1 / factor


@dataclass
class ScheduleEvidence:
    """The learning-rate trajectory a run actually used, against what it was configured with.

    ``lr``: step -> the largest lr over param groups, from the metric log (the Recorder logs it
    every step), each logged batch and each checkpoint. ``reference``: what the lr was meant to
    be: the scheduler's ``initial_lr`` when recorded, else the optimizer's configured lr.
    """

    lr: dict[int, float]
    reference: float | None
    reference_source: str
    weight_decay: float
    decoupled: bool  # AdamW (or decoupled_weight_decay=True): weights *= 1 - lr * wd each step
    jumps: list[Jump]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"jumps": [j.to_dict() for j in self.jumps]}


def schedule_evidence(run: Run) -> ScheduleEvidence:
    recorded = history(run)
    lr = {s: _largest(groups, "lr") for s, groups in recorded.items()}
    lr = {s: v for s, v in lr.items() if v is not None}
    try:
        logged = run.logged("lr")
    except DiagError:  # an empty or unreadable log adds nothing here; the curve commands say why
        logged = {}
    lr |= {s: v for s, v in logged.items() if s not in lr}
    groups = [g for gs in recorded.values() for g in gs]
    kwargs = run.manifest.optimizer.kwargs
    initial = _largest(groups, "initial_lr")
    configured = kwargs.get("lr") if _number(kwargs.get("lr")) else None
    decay = _largest(groups, "weight_decay")
    decay = decay if decay is not None else float(kwargs.get("weight_decay", 0.0) or 0.0)
    decoupled = run.manifest.optimizer.name == "AdamW" or any(
        g.get("decoupled_weight_decay") is True for g in groups
    )
    return ScheduleEvidence(
        dict(sorted(lr.items())),
        initial if initial is not None else configured,
        "initial_lr" if initial is not None else "configured" if configured else "none",
        decay,
        decoupled,
        jumps(recorded),
    )


def _largest(groups: list[dict[str, Any]], key: str) -> float | None:
    values = [float(g[key]) for g in groups if _number(g.get(key))]
    return max(values) if values else None


def schedule_causes(evidence: ScheduleEvidence) -> list[rules.Finding]:
    """The recorded trajectory's causes: a jump, an lr past its configured value, AdamW's
    1 − lr·wd; each rule's precondition is in the evidence."""
    said = evidence.to_dict()
    found = [
        rules.schedule_jumps(said["jumps"]),
        rules.lr_beyond_reference(said),
        rules.decoupled_decay_unstable(said),
    ]
    return [f for f in found if f is not None]
