"""One convention for logged scalars across every log reader: a value logged non-finite stays
apart from one not logged at all. Text readers mark it ("NaN"); the streaming readers collect
(step, value) arrays per metric into Arrow-backed columns, where "not logged" is null."""

from __future__ import annotations

import math
from array import array

import numpy as np
import pandas as pd

Points = tuple[array, array]  # steps (int64) and values (float64), in the order logged


def marked(value: object) -> object:
    """A logged non-finite float becomes text, so it stays apart from a missing value (NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def first_nonfinite(series: dict[int, float]) -> int | None:
    """The first step whose logged value is NaN or infinite."""
    return next((s for s in sorted(series) if not math.isfinite(series[s])), None)


def add_point(series: dict[str, Points], metric: str, step: int, value: float) -> None:
    """One logged scalar onto its metric's arrays."""
    steps, values = series.setdefault(metric, (array("q"), array("d")))
    steps.append(step)
    values.append(value)


def later_wins(found: list[Points]) -> tuple[np.ndarray, np.ndarray]:
    """One metric's points over its files, by step; where they overlap, the later file's value
    (and within one file the later write), as TensorBoard and W&B show a restarted run."""
    steps = np.concatenate([np.frombuffer(s, dtype=np.int64) for s, _ in found])
    values = np.concatenate([np.frombuffer(v, dtype=np.float64) for _, v in found])
    order = np.argsort(steps[::-1], kind="stable")  # reversed: the last write comes first
    kept, first = np.unique(steps[::-1][order], return_index=True)
    return kept, values[::-1][order][first]


def scalar_frame(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Every metric on the union of the steps: Arrow-backed, so a step a metric was not logged
    at is null and a logged NaN stays a value."""
    import pyarrow as pa

    steps = np.unique(np.concatenate([s for s, _ in series.values()]))
    columns: dict[str, object] = {"step": steps}
    for tag, (at, values) in series.items():
        column = np.zeros(len(steps))
        logged = np.zeros(len(steps), dtype=bool)
        where = np.searchsorted(steps, at)
        column[where], logged[where] = values, True
        columns[tag] = pd.Series(pa.array(column, mask=~logged), dtype=pd.ArrowDtype(pa.float64()))
    return pd.DataFrame(columns)
