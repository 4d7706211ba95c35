"""One convention for logged scalars across every log reader."""

from __future__ import annotations

import math


def marked(value: object) -> object:
    """A logged non-finite float becomes text, so it stays apart from a missing value (NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def first_nonfinite(series: dict[int, float]) -> int | None:
    """The first step whose logged value is NaN or infinite."""
    return next((s for s in sorted(series) if not math.isfinite(series[s])), None)
