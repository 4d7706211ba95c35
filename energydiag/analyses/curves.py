"""Forensics on a logged metric curve: plateaus, exact-constant stretches, spikes, divergence,
oscillation and the first non-finite value, each with the step range where it happens.

Everything is vectorised (numpy, pandas rolling windows) so a ten-million-row log takes seconds.
For InfoNCE losses, the plateau's level is compared with the bounds the configuration allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from energydiag import findings as rules
from energydiag.analyses.early_warning import OfflineAlarm
from energydiag.analyses.medians import EXACT_POINTS, coarse, rolling_median
from energydiag.analyses.rank_logs import RankLog
from energydiag.io.metrics import metric_series
from energydiag.schema import Report, report

SPIKE_Z = 8.0
SPIKE_FLOOR_REL = 0.01  # a spike stands out by 8x the noise, and never less than 8% of the level
NEAR_CHANCE_SPAN = 0.5  # a noisy stall at chance covers at least half the logged steps
OSCILLATION_CHUNK = 24  # first differences per chunk of the alternation test
MIN_PLATEAU_POINTS = 5  # a plateau covers at least this many logged points ...
MIN_PLATEAU_SPAN = 0.1  # ... and at least this fraction of the logged steps
FLAT_REL = 0.01  # a window is flat when its net change is under 1% of the level ...
QUIET_REL = 0.02  # ... and its noise (MAD) under 2% of the level


@dataclass
class Segment:
    start: int
    end: int
    level: float

    @property
    def length(self) -> int:
        return self.end - self.start


@report("curves")
@dataclass
class CurveReport(Report):
    metric: str
    points: int
    window: int
    first_nonfinite: int | None = None
    plateaus: list[Segment] = field(default_factory=list)
    constant: list[Segment] = field(default_factory=list)
    spikes: list[dict[str, float]] = field(default_factory=list)
    divergence: Segment | None = None
    oscillations: list[Segment] = field(default_factory=list)
    unstable: Segment | None = None
    bounds: dict[str, float] | None = None
    plateau_on: str | None = None
    left_plateau: dict[str, float] | None = None  # the loss left its last plateau for good
    findings: list[rules.Finding] = field(default_factory=list)
    display: dict[str, list[float]] = field(default_factory=dict)
    ranks: list[RankLog] = field(default_factory=list)  # a multi-rank run: each rank's own log
    alarms: list[OfflineAlarm] = field(default_factory=list)  # the live monitors, offline
    alarms_unchecked: list[str] = field(default_factory=list)  # rules whose column is not logged


def analyse(
    frame: pd.DataFrame,
    metric: str,
    window: int | None = None,
    bounds: dict[str, float] | None = None,
) -> CurveReport:
    """The whole curve report; values near ±1e308 overflow intermediate differences, which then
    simply flag nothing, so numpy's overflow warnings are not shown."""
    with np.errstate(all="ignore"):
        return _analyse(frame, metric, window, bounds)


def _analyse(
    frame: pd.DataFrame, metric: str, window: int | None, bounds: dict[str, float] | None
) -> CurveReport:
    steps, values = metric_series(frame, metric)
    finite = np.isfinite(values)
    report = CurveReport(metric, len(values), 0, bounds=bounds)
    if not finite.all():
        report.first_nonfinite = int(steps[np.argmin(finite)])
        steps, values = steps[finite], values[finite]
    del finite
    if len(values) < MIN_PLATEAU_POINTS:
        report.display = _display(steps, values, values)
        report.findings = rules.ranked([rules.curve_nonfinite(report.first_nonfinite, metric)])
        return report
    # A longer log is shaped on the medians of its blocks (a plateau of a tenth of ten million
    # points is a million of them); spikes and repeated values are found point by point.
    size = -(-len(values) // EXACT_POINTS)
    shaped = coarse(steps, values, size) if size > 1 else (steps, values)
    noise = _shape(report, *shaped, window and max(window // size, 3), bounds, metric)
    if size > 1:
        noise = _noise(values, report.window)
    report.window *= size
    report.constant = _constant(steps, values, min_len=max(MIN_PLATEAU_POINTS, report.window // 2))
    rise_from = report.divergence.start if report.divergence else None
    nearby = rolling_median(values, 7)  # narrow: a wide median lags on slopes near the edges
    report.spikes = [
        p
        for p in _spikes(steps, values, nearby, noise)
        if rise_from is None or p["step"] < rise_from
    ]
    report.findings = rules.ranked(
        [
            rules.curve_nonfinite(report.first_nonfinite, metric),
            rules.curve_plateau(
                report.plateaus, report.plateau_on, bounds, metric, report.left_plateau
            ),
            rules.curve_constant(report.constant, metric, loss_like(metric)),
            rules.curve_divergence(report.divergence, metric),
            rules.curve_spikes(report.spikes, metric),
            rules.curve_oscillation(report.oscillations, metric),
            rules.curve_unstable(report.unstable, metric),
        ]
    )
    return report


def loss_like(metric: str) -> bool:
    return "loss" in metric.lower()


def _shape(
    report: CurveReport,
    steps: np.ndarray,
    values: np.ndarray,
    window: int | None,
    bounds: dict[str, float] | None,
    metric: str,
) -> np.ndarray:
    """The curve's shape: plateaus, divergence, oscillation, an erratic turn. Returns the noise
    scale per point of this series."""
    w = window or int(np.clip(len(values) // 20, 3 if len(values) < 200 else 10, 100_000))
    report.window = w
    smooth = rolling_median(values, max(3 if len(values) < 60 else 5, min(w // 2, 501)))
    noise = _noise(values, w)
    report.plateaus = _plateaus(steps, smooth, noise, w)
    if bounds and "chance" in bounds and not report.plateaus:
        report.plateaus = _near_chance(steps, values, noise, w, bounds["chance"])
    report.divergence = _divergence(steps, smooth, noise, w, report.first_nonfinite is not None)
    report.oscillations = _oscillations(steps, values, smooth, w) if loss_like(metric) else []
    report.unstable = _unstable(steps, values)
    report.display = _display(steps, values, smooth)
    if bounds and report.plateaus:
        last = report.plateaus[-1]
        inside = values[(steps >= last.start) & (steps <= last.end)]
        report.plateau_on = _which_bound(last.level, _spread(inside), bounds)
    if report.plateaus:
        report.left_plateau = _left(steps, values, report.plateaus[-1])
    return noise


def _noise(values: np.ndarray, w: int) -> np.ndarray:
    """Noise from first differences (sigma = 1.4826 * median|dx| / sqrt 2): residuals from a
    rolling median are exactly zero at the median point and would bias the scale low. A few
    quiet points must not make ordinary noise look like a spike: the local scale is floored at
    half the series' typical noise."""
    jumps = np.diff(values, prepend=values[0])
    np.abs(jumps, out=jumps)
    local = rolling_median(jumps, max(11, min(w, 1001)))
    del jumps
    local *= 1.4826 / math.sqrt(2)
    return np.maximum(local, 0.5 * float(np.median(local)), out=local)


def trend(values: list[float], fraction: float = 0.1) -> tuple[float, float] | None:
    """Mean of the first and of the last ``fraction`` of the finite values: where a curve went."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    k = max(1, int(len(finite) * fraction))
    return sum(finite[:k]) / k, sum(finite[-k:]) / k


def _spans(mask: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """Index ranges [a, b) where ``mask`` holds, at least ``min_len`` long."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [
        (int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True) if b - a >= min_len
    ]


def _segments(spans: list[tuple[int, int]], steps: np.ndarray, values: np.ndarray) -> list[Segment]:
    return [
        Segment(int(steps[a]), int(steps[b - 1]), float(np.median(values[a:b]))) for a, b in spans
    ]


def _runs(mask: np.ndarray, steps: np.ndarray, values: np.ndarray, min_len: int) -> list[Segment]:
    return _segments(_spans(mask, min_len), steps, values)


def _constant(steps: np.ndarray, values: np.ndarray, min_len: int) -> list[Segment]:
    """Stretches of bit-identical values: a run of equal neighbour pairs [a, b) covers points a..b."""
    same = values[1:] == values[:-1]
    return _segments([(a, b + 1) for a, b in _spans(same, min_len - 1)], steps, values)


def _covered(flags: np.ndarray, width: int, n: int) -> np.ndarray:
    """Points covered by any window [i, i + width) whose start i is flagged: point j is when a
    start lies in (j - width, j], a difference of running counts."""
    counts = np.empty(n + 1, dtype=np.int64)
    counts[0] = 0
    np.cumsum(flags, out=counts[1 : len(flags) + 1])
    counts[len(flags) + 1 :] = counts[len(flags)]
    reach = min(width, n)
    behind = np.concatenate([np.zeros(reach, dtype=np.int64), counts[1 : n + 1 - reach]])
    return counts[1:] > behind


def _plateaus(steps: np.ndarray, smooth: np.ndarray, noise: np.ndarray, w: int) -> list[Segment]:
    """Flat, quiet stretches covering enough logged points and enough of the logged steps."""
    n = len(smooth)
    if n <= w:
        w = n - 1
    level = np.maximum(np.abs(smooth[: n - w]), 1e-12)
    change = np.abs(smooth[w:] - smooth[: n - w])
    flat = (change < FLAT_REL * level) & (noise[: n - w] < QUIET_REL * level)
    found = _runs(_covered(flat, w + 1, n), steps, smooth, min_len=max(w, MIN_PLATEAU_POINTS))
    span = max(int(steps[-1] - steps[0]), 1)
    return [s for s in found if s.length >= MIN_PLATEAU_SPAN * span]


def _left(steps: np.ndarray, values: np.ndarray, plateau: Segment) -> dict[str, float] | None:
    """Where the loss went after a plateau that ends before the last tenth of the log: the
    median of that last tenth, when it is below the plateau by more than the plateau's noise
    (three times) and 5% of its level. A slow start that then learns is not a stall."""
    span = steps[-1] - steps[0]
    tail = values[steps >= steps[-1] - 0.1 * span]
    if plateau.end >= steps[-1] - 0.1 * span or not len(tail):
        return None
    inside = values[(steps >= plateau.start) & (steps <= plateau.end)]
    end = float(np.median(tail))
    if plateau.level - end <= max(3 * _spread(inside), 0.05 * abs(plateau.level)):
        return None
    return {"from_step": int(plateau.end), "level_at_end": end}


def _near_chance(
    steps: np.ndarray, values: np.ndarray, noise: np.ndarray, w: int, chance: float
) -> list[Segment]:
    """A stall too noisy to be "quiet" (B = 8 noise is ~3% of log 8) but whose running median
    stays within its own error of chance for most of the run: no learning, only noise. Runs
    start at chance, so this needs half the logged steps, not a tenth."""
    width = min(max(2 * w, 15), 1001)
    smooth = rolling_median(values, width)
    # within one step's noise of chance: a learning run leaves that band for good
    tolerance = max(float(np.median(noise)), 0.005 * chance)
    # below chance is where learning shows, so that side is tight; above it, B = 8 losses of
    # random energies sit a little over log B
    near = (smooth >= chance - tolerance) & (smooth <= chance + 3 * tolerance)
    # brief excursions do not end a stall: most of the points around each one must be near
    mostly = pd.Series(near.astype(float)).rolling(width, center=True, min_periods=1).mean()
    found = _runs(mostly.to_numpy() >= 0.8, steps, smooth, min_len=max(3 * w, MIN_PLATEAU_POINTS))
    span = max(int(steps[-1] - steps[0]), 1)
    return [s for s in found if s.length >= NEAR_CHANCE_SPAN * span]


def _spikes(
    steps: np.ndarray, values: np.ndarray, reference: np.ndarray, noise: np.ndarray
) -> list[dict[str, float]]:
    """Points ``SPIKE_Z`` scales away from the reference. Both scratch arrays are overwritten
    (the noise becomes the scale, the reference the z-score): on a ten-million-point log each
    copy spared is 80 MB."""
    scale = np.abs(reference)
    np.maximum(scale, 1e-12, out=scale)
    scale *= SPIKE_FLOOR_REL
    np.maximum(noise, scale, out=noise)
    del scale
    z = np.subtract(values, reference, out=reference)
    z /= noise
    idx = np.flatnonzero((z > SPIKE_Z) | (z < -SPIKE_Z))
    top = idx[np.argsort(-np.abs(z[idx]))][:20]
    return [
        {"step": int(steps[i]), "value": float(values[i]), "z": float(z[i])} for i in sorted(top)
    ]


def _divergence(
    steps: np.ndarray, smooth: np.ndarray, noise: np.ndarray, w: int, ends_nonfinite: bool
) -> Segment | None:
    """A rise above the running minimum that lasts to the end of the log (or to a NaN)."""
    floor = np.minimum.accumulate(smooth)
    threshold = np.maximum(0.5 * np.abs(floor), 10 * noise)
    above = smooth - floor > threshold
    if not above[-1]:
        return None
    start = len(above) - int(np.argmin(above[::-1])) if not above.all() else 0
    if len(above) - start < min(w, 10) and not ends_nonfinite:
        return None
    return Segment(int(steps[start]), int(steps[-1]), float(floor[start]))


def _oscillations(
    steps: np.ndarray, values: np.ndarray, smooth: np.ndarray, w: int
) -> list[Segment]:
    """Stretches where the loss goes up, down, up, down, step after step, with real amplitude.

    For independent noise, consecutive first differences change sign 2/3 of the time; a
    period-2 oscillation changes sign every step. A chunk counts when at least 90% of its
    differences alternate (over 3σ above the 2/3 of noise at 24 points) and its alternating part
    is over 2% of the level; two chunks in a row make an oscillation. Small-batch noise, which
    the lag-1 test of a narrowly detrended series used to call an oscillation, stays quiet.
    """
    size = max(OSCILLATION_CHUNK, w)
    diffs = np.diff(values)
    m = len(diffs) // size
    if m < 2:
        return []
    chunks = diffs[: m * size].reshape(m, size)
    alternating = (np.sign(chunks[:, 1:]) * np.sign(chunks[:, :-1]) < 0).mean(axis=1)
    amplitude = np.abs(chunks).mean(axis=1) / 2
    levels = np.maximum(np.abs(smooth[: m * size].reshape(m, size).mean(axis=1)), 1e-12)
    hits = (alternating >= 0.9) & (amplitude > 0.02 * levels)
    return _runs(np.repeat(hits, size), steps[: m * size], np.repeat(amplitude, size), 2 * size)


def _spread(values: np.ndarray) -> float:
    """Robust noise of a stretch: 1.4826 × the median absolute deviation."""
    return float(1.4826 * np.median(np.abs(values - np.median(values)))) if len(values) else 0.0


def _unstable(steps: np.ndarray, values: np.ndarray, factor: float = 10.0) -> Segment | None:
    """The point after which step-to-step changes are ``factor`` times larger than before it:
    the signature of an lr or gradient event that leaves the loss finite but erratic.

    The split is found in O(n) with running means, then confirmed with medians so that one late
    spike does not count; ``level`` is the typical change after the split.
    """
    jumps = np.abs(np.diff(values))
    n = len(jumps)
    if n < 10:  # five changes before the split and five after it, at least
        return None
    sums = np.concatenate([[0.0], np.cumsum(jumps)])
    split = np.arange(5, n - 4)  # five each side: one spike (two big changes) cannot carry a median
    floor = 1e-3 * max(float(np.median(np.abs(values))), 1e-12)  # flat is not "10x quieter"
    before = np.maximum(sums[split] / split, floor)
    after = (sums[n] - sums[split]) / (n - split)
    k = int(split[np.argmax(after / before)])
    calm, rough = max(float(np.median(jumps[:k])), floor), float(np.median(jumps[k:]))
    if rough < factor * calm:
        return None
    # A loss that leaves a quiet start by descending is learning, not erratic: small-batch noise
    # grows as the energies start to differ. Erratic is louder *without* getting lower.
    before, after = float(np.median(values[: k + 1])), float(np.median(values[k + 1 :]))
    if after < before - rough:
        return None
    return Segment(int(steps[k]), int(steps[-1]), rough / calm)


def _which_bound(level: float, noise: float, bounds: dict[str, float]) -> str | None:
    """'chance' or 'floor' when the level is within its own noise of it (and within 0.5%);
    a level measurably below chance is not at chance."""
    chance, floor = bounds["chance"], bounds.get("floor", 0.0)
    tolerance = max(3 * noise, 0.005 * chance)
    if abs(level - chance) <= tolerance:
        return "chance"
    if "floor" in bounds and abs(level - floor) <= tolerance:
        return "floor"
    return None


def _display(
    steps: np.ndarray, values: np.ndarray, smooth: np.ndarray, points: int = 2000
) -> dict[str, list[float]]:
    """At most ``points`` bins (median of each) for plots and sparklines, whatever the log's length.
    The bins are ``np.array_split``'s: the first n mod k hold one point more."""
    k = min(points, len(values))
    size, longer = divmod(len(values), k)
    cut = longer * (size + 1)
    medians = [np.median(values[:cut].reshape(longer, size + 1), axis=1)] if longer else []
    medians.append(np.median(values[cut:].reshape(k - longer, size), axis=1))
    starts = np.concatenate([np.arange(longer) * (size + 1), cut + np.arange(k - longer) * size])
    pick = starts + np.where(np.arange(k) < longer, (size + 1) // 2, size // 2)
    return {
        "step": steps[pick].tolist(),
        "value": np.concatenate(medians).tolist(),
        "smooth": smooth[pick].tolist(),
    }
