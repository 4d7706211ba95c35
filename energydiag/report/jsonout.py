"""Strict JSON for machines: non-finite numbers become the strings "NaN", "Infinity", "-Infinity"."""

from __future__ import annotations

import json
import math
from typing import Any

from energydiag.schema import encode


def jsonable(obj: Any) -> Any:
    """The data ``schema.encode`` makes of ``obj``, with its non-finite numbers spelled out."""
    return _spelled(encode(obj))


def _spelled(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _spelled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_spelled(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def dumps(obj: Any) -> str:
    return json.dumps(jsonable(obj), indent=2, allow_nan=False)
