"""Medians of long series: exact up to ``EXACT_POINTS``, medians of blocks beyond.

An exact rolling median of a ten-million-point log takes seconds per call, and a curve's
features (a plateau over a tenth of the log) are far wider than a block, so long logs are
shaped on block medians; below the limit every median is exact.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EXACT_POINTS = 200_000


def rolling_median(values: np.ndarray, width: int) -> np.ndarray:
    """Exact up to EXACT_POINTS; beyond, medians of blocks (an exact rolling median of a
    ten-million-point log takes seconds per call, and the curve's features are far wider)."""
    if len(values) <= EXACT_POINTS:
        rolling = pd.Series(values).rolling(width, center=True, min_periods=1)
        return rolling.median().to_numpy(copy=True)  # writable: callers scale it in place
    return _block_median(values, width)


def _block_median(values: np.ndarray, width: int) -> np.ndarray:
    """Each point gets its block's median; a wide window is a rolling median of 5 medians of
    blocks of width / 5, so the level follows the curve at a fifth of the window's width."""
    medians, counts = block_medians(values, max(1, width // 5) if width > 15 else width)
    if width > 15:
        medians = pd.Series(medians).rolling(5, center=True, min_periods=1).median().to_numpy()
    return np.repeat(medians, counts)


def coarse(steps: np.ndarray, values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of ``size`` points: each block's middle step and median value."""
    medians, counts = block_medians(values, size)
    starts = np.cumsum(counts) - counts
    return steps[starts + counts // 2], medians


def block_medians(values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Medians of consecutive blocks of ``size`` points (the last may be shorter), with each
    block's number of points."""
    full = len(values) // size * size
    medians = np.median(values[:full].reshape(-1, size), axis=1)
    counts = np.full(len(medians), size)
    if full < len(values):
        medians = np.append(medians, np.median(values[full:]))
        counts = np.append(counts, len(values) - full)
    return medians, counts
