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
    ``columns``: the logged scalars it reads, the first the one it judges."""

    name = "monitor"
    columns: tuple[str, ...] = ("grad_norm",)
    optional: tuple[str, ...] = ()  # read when logged (NaN where not)

    def observe(self, step: int, row: dict[str, float]) -> Alarm | None:
        raise NotImplementedError

    def first_fire(self, steps: np.ndarray, *values: np.ndarray) -> int | None:
        """The first step at which ``observe`` would fire over this logged series: one array per
        column, then per optional column, on the steps where the columns were all logged."""
        raise NotImplementedError


def first_run(steps: np.ndarray, held: np.ndarray, length: int) -> int | None:
    """The step at which ``held`` has been true for ``length`` entries in a row."""
    padded = np.concatenate([[0], held.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[::2], edges[1::2]
    long = np.flatnonzero(ends - starts >= length)
    return int(steps[starts[long[0]] + length - 1]) if len(long) else None


class Sustained(Monitor):
    """A condition held for ``steps`` observations in a row (after ``after``): one alarm per
    stretch. Subclasses say what holds over arrays (``held``: one per column, then per optional
    column, NaN where not logged) and why; a live row is judged as a one-element series, so
    online and offline share one definition."""

    steps, after = 3, 0

    def __init__(self) -> None:
        self.run, self.fired, self.since = 0, False, None

    def holds(self, row: dict[str, float]) -> bool:
        values = [np.array([row.get(c, math.nan)]) for c in (*self.columns, *self.optional)]
        return bool(self.held(*values)[0])

    def held(self, *values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def message(self, step: int, row: dict[str, float]) -> Alarm:
        raise NotImplementedError

    def observe(self, step: int, row: dict[str, float]) -> Alarm | None:
        if any(not math.isfinite(row.get(c, math.nan)) for c in self.columns):
            return None  # not measured on this step
        if step < self.after or not self.holds(row):
            self.run, self.fired = 0, False
            return None
        self.since = step if self.run == 0 else self.since
        self.run += 1
        if self.run < self.steps or self.fired:
            return None
        self.fired = True
        return self.message(step, row)

    def first_fire(self, steps: np.ndarray, *values: np.ndarray) -> int | None:
        finite = np.logical_and.reduce([np.isfinite(v) for v in values[: len(self.columns)]])
        steps, values = steps[finite], [v[finite] for v in values]
        return first_run(steps, self.held(*values) & (steps >= self.after), self.steps)


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
    columns = ("max_abs_weight",)

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
        # per step, whatever the spacing of the series (a log every k steps, checkpoints)
        gaps = np.maximum(steps[self.window :] - steps[: -self.window], 1)
        rate = (v[self.window :] / v[: -self.window]) ** (1 / gaps)
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


class AboveLimit(Sustained):
    """The monitor's column above ``limit`` on any one check, from step ``after``."""

    steps = 1

    def __init__(self, limit: float, after: int) -> None:
        super().__init__()
        self.limit, self.after = limit, after

    def held(self, values: np.ndarray) -> np.ndarray:
        return values > self.limit


class UpdateTooLarge(AboveLimit):
    """One optimizer step moved the weights by more than ``limit`` of their norm (healthy
    training moves them by 1e-3 to 1e-2): the lr, or a gradient, is far too large. Not in the
    first ``after`` steps, where fresh weights far from any fit take their largest steps."""

    name = "update_ratio"
    columns = ("update_ratio",)

    def __init__(self, limit: float = 0.1, after: int = 25) -> None:
        super().__init__(limit, after)

    def message(self, step: int, row: dict[str, float]) -> Alarm:
        ratio = row["update_ratio"]
        return Alarm(
            step,
            self.name,
            f"one optimizer step changed the weights by {ratio:.3g} of their norm (healthy "
            f"steps change them by 1e-3 to 1e-2; the limit is {self.limit:g})",
            {"update_ratio": ratio, "limit": self.limit},
        )


class AdamRatioHigh(AboveLimit):
    """Adam's g²/v̂ above ``limit``: this gradient is far larger than any in the optimizer's
    memory, so its update is many lr's long."""

    name = "adam_ratio"
    columns = ("adam_ratio",)

    def __init__(self, limit: float = 1e3, after: int = 10) -> None:
        super().__init__(limit, after)

    def message(self, step: int, row: dict[str, float]) -> Alarm:
        ratio = row["adam_ratio"]
        return Alarm(
            step,
            self.name,
            f"the squared gradient is {ratio:.3g}× Adam's second moment (≈ 1 while gradients "
            "resemble their history): a batch unlike any before, an update of many lr's",
            {"adam_ratio": ratio, "limit": self.limit},
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
    """A fresh set (monitors keep state): the rules on by default, the energy models' with them
    (by import string: they live in the contrastive layer, see ``record/live.py``)."""
    from energydiag.engine.registry import LIVE_ENERGY, resolve

    energy = resolve(LIVE_ENERGY["monitors"], "energy monitors")
    generic = [GradNormBand(), WeightGrowth(), DeadGradient(), UpdateTooLarge(), AdamRatioHigh()]
    return [*generic, *energy()]
