"""Live alarms: cheap rules over each step's scalars that fire before a run goes non-finite.

Each rule is also written over a whole logged series (``first_fire``, vectorised), so ``curves``
can say where it would have fired on a run recorded without it: the same definition, the same
first step.

Each monitor keeps its own band, learned from the run's own history, so nobody writes a
threshold for their model: the gradient norm against an EMA of its log (a z-score, as ZClip
bands it), and the geometric growth rate of the largest weight, extrapolated to the step at
which float32 squares of it overflow. A monitor sees the row the Recorder logs (``loss``,
``grad_norm``, ``max_abs_weight``...) and returns an Alarm or None; it never syncs the device.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from energydiag.schema import Record

FLOAT32_MAX = 3.4028234663852886e38
SQUARE_LIMIT = math.sqrt(FLOAT32_MAX)  # |w| beyond this overflows a float32 sum of squares


@dataclass
class Alarm(Record):
    step: int
    rule: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    forecast: dict[str, Any] | None = None  # {"quantity", "per_step", "steps_to_overflow"}


class Monitor:
    """One rule with its own state; ``name`` is what silences it (``monitors=`` without it).
    ``column``: the logged scalar it reads."""

    name = "monitor"
    column = "grad_norm"

    def observe(self, step: int, row: dict[str, float]) -> Alarm | None:
        raise NotImplementedError

    def first_fire(self, steps: np.ndarray, values: np.ndarray) -> int | None:
        """The first step at which ``observe`` would fire over this logged series."""
        raise NotImplementedError


class GradNormBand(Monitor):
    """The gradient norm far above its running band: an EMA of log-norm mean and variance,
    learned over ``warmup`` steps, alarming at ``z`` standard deviations and at least
    ``ratio`` times the running mean (a spike from one bad batch)."""

    name = "grad_norm_band"

    def __init__(self, z: float = 8.0, ratio: float = 5.0, warmup: int = 25, alpha: float = 0.1):
        self.z, self.ratio, self.warmup, self.alpha = z, ratio, warmup, alpha
        self.mean, self.var, self.seen = 0.0, 0.0, 0

    def observe(self, step: int, row: dict[str, float]) -> Alarm | None:
        norm = row.get("grad_norm")
        if norm is None or not math.isfinite(norm) or norm <= 0:
            return None
        x = math.log(norm)
        if self.seen >= self.warmup:
            std = math.sqrt(self.var) + 1e-3
            score = (x - self.mean) / std
            if score >= self.z and x - self.mean >= math.log(self.ratio):
                return self._alarm(step, norm, score)  # a spike is not learned into the band
        self._learn(x)
        return None

    def first_fire(self, steps: np.ndarray, values: np.ndarray) -> int | None:
        import pandas as pd

        valid = np.isfinite(values) & (values > 0)
        x, steps = np.log(values[valid]), steps[valid]
        if len(x) <= self.warmup:
            return None
        # the online recursion as exponentially weighted means (until the first alarm, every
        # point is learned): mean_t, and var_t as the EWM of (1 - alpha)·delta_t²
        mean = pd.Series(x).ewm(alpha=self.alpha, adjust=False).mean().to_numpy()
        rise = x[1:] - mean[:-1]  # each point against the band before it was learned
        delta2 = (1 - self.alpha) * np.concatenate([[0.0], rise]) ** 2
        var = pd.Series(delta2).ewm(alpha=self.alpha, adjust=False).mean().to_numpy()
        score = rise / (np.sqrt(var[:-1]) + 1e-3)
        fired = (score >= self.z) & (rise >= math.log(self.ratio))
        fired[: self.warmup - 1] = False
        hits = np.flatnonzero(fired)
        return int(steps[hits[0] + 1]) if len(hits) else None

    def _learn(self, x: float) -> None:
        if self.seen == 0:
            self.mean = x
        delta = x - self.mean
        self.mean += self.alpha * delta
        self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.seen += 1

    def _alarm(self, step: int, norm: float, score: float) -> Alarm:
        usual = math.exp(self.mean)
        return Alarm(
            step,
            self.name,
            f"gradient norm {norm:.3g} is {score:.1f} standard deviations above its running "
            f"band (usually {usual:.3g}, ×{norm / usual:.3g})",
            {"grad_norm": norm, "band_mean": usual, "z": score},
        )


class WeightGrowth(Monitor):
    """The largest weight growing geometrically: over the last ``window`` steps by at least
    ``per_step`` each, and past ``above`` times its first value; the alarm forecasts the step at
    which float32 squares of it overflow, at the measured rate."""

    name = "weight_growth"
    column = "max_abs_weight"

    def __init__(self, window: int = 10, per_step: float = 1.05, above: float = 4.0):
        self.window, self.per_step, self.above = window, per_step, above
        self.history: deque[float] = deque(maxlen=window + 1)
        self.first: float | None = None
        self.quiet_until = -1  # one alarm per window while the growth goes on

    def first_fire(self, steps: np.ndarray, values: np.ndarray) -> int | None:
        valid = np.isfinite(values) & (values > 0)
        v, steps = values[valid], steps[valid]
        if len(v) <= self.window:
            return None
        rate = (v[self.window :] / v[: -self.window]) ** (1 / self.window)
        fired = (rate >= self.per_step) & (v[self.window :] >= self.above * v[0])
        hits = np.flatnonzero(fired)
        return int(steps[hits[0] + self.window]) if len(hits) else None

    def observe(self, step: int, row: dict[str, float]) -> Alarm | None:
        value = row.get("max_abs_weight")
        if value is None or not math.isfinite(value) or value <= 0:
            return None
        self.first = self.first or value
        self.history.append(value)
        if len(self.history) <= self.window or value < self.above * self.first:
            return None
        rate = (value / self.history[0]) ** (1 / self.window)
        if rate < self.per_step or step <= self.quiet_until:
            return None
        self.quiet_until = step + self.window
        # the latest few steps extrapolate best: the window may straddle the change that began it
        recent = self.window // 3
        rate = max(rate, (value / self.history[-1 - recent]) ** (1 / recent))
        steps = math.log(SQUARE_LIMIT / value) / math.log(rate)
        return Alarm(
            step,
            self.name,
            f"max|w| {value:.3g} grows ×{rate:.3g} per step (×{value / self.first:.3g} since the "
            f"start): at this rate float32 squares overflow in ≈ {steps:.0f} steps",
            {"max_abs_weight": value, "first": self.first, "per_step": rate},
            {"quantity": "max_abs_weight", "per_step": rate, "steps_to_overflow": steps},
        )


class DeadGradient(Monitor):
    """Gradients that were flowing and stopped: a norm of exactly zero for ``steps`` steps in a
    row (a bounded head saturated, a mask that blocks everything, a detached graph)."""

    name = "dead_gradient"

    def __init__(self, steps: int = 5):
        self.steps, self.zeros, self.flowed, self.fired = steps, 0, False, False

    def first_fire(self, steps: np.ndarray, values: np.ndarray) -> int | None:
        valid = np.isfinite(values)
        norm, steps = values[valid], steps[valid]
        zero = np.concatenate([[False], norm == 0, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(zero))
        flowed = np.cumsum(norm > 0)
        for start, end in zip(edges[::2], edges[1::2], strict=True):
            if end - start >= self.steps and start > 0 and flowed[start - 1] > 0:
                return int(steps[start + self.steps - 1])
        return None

    def observe(self, step: int, row: dict[str, float]) -> Alarm | None:
        norm = row.get("grad_norm")
        if norm is None or not math.isfinite(norm):
            return None
        if norm > 0:
            self.zeros, self.flowed, self.fired = 0, True, False
            return None
        self.zeros += 1
        if not self.flowed or self.fired or self.zeros < self.steps:
            return None
        self.fired = True
        return Alarm(
            step,
            self.name,
            f"the gradient norm has been exactly 0 for {self.zeros} steps after flowing: nothing "
            "learns (a saturated bounded head, a mask that blocks every input, a detached graph)",
            {"zero_steps": self.zeros},
        )


def default_monitors() -> list[Monitor]:
    """A fresh set (monitors keep state): the rules on by default."""
    return [GradNormBand(), WeightGrowth(), DeadGradient()]
