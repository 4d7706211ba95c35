"""Hyperparameters over steps: the schedule a run actually used, and its abrupt changes.

The Recorder stores each step's param-group settings with its batch; checkpoints hold the
settings of their moment. A learning rate that jumps by orders of magnitude between two steps
(a warm-up divided by zero, a scheduler stepped a million times) is a cause, not a symptom.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

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
