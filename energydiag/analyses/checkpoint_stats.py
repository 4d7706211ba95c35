"""Per-tensor and per-layer statistics of one checkpoint, streamed one tensor at a time.

Shared by inspect, timeline and bisect. Every number is overflow-safe (engine.tensorstats), so a
checkpoint whose weights reached 1e28 reports 1e28, not +Inf, and "exploded" is a verdict of its
own: values far beyond any sane initialisation while every element is still finite.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from energydiag.engine.quantities import layer_of
from energydiag.engine.step import AUTOCAST_DTYPES
from energydiag.engine.tensorstats import summarize
from energydiag.errors import DiagError
from energydiag.io.state import MODEL_PREFIX, OPTIM_PREFIX, RNG_PREFIX
from energydiag.schema import Record

EXPLODED_ABS = 1e4  # no trained weight of a sane network sits this far from zero
ADAM_RATIO_LIMIT = 100.0


@dataclass
class TensorStats:
    name: str
    group: str
    layer: str
    shape: list[int]
    dtype: str
    numel: int
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    first_nonfinite: list[int] | None = None
    min: float = math.nan
    max: float = math.nan
    mean: float = math.nan
    std: float = math.nan
    l2: float = math.nan
    rms: float = math.nan
    max_abs: float = math.nan
    zero_fraction: float = math.nan
    square_overflows_fp32: bool = False
    beyond_autocast_range: int = 0

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf


@dataclass
class CheckpointStats(Record):
    path: str
    metadata: dict[str, str]
    tensors: list[TensorStats]
    layers: list[dict[str, Any]]
    adam: list[dict[str, Any]] = field(default_factory=list)

    def model_layers(self) -> dict[str, dict[str, Any]]:
        return {r["layer"]: r for r in self.layers if r["group"] == "model"}

    def exploded(self, limit: float = EXPLODED_ABS) -> list[dict[str, Any]]:
        """Model layers whose finite values exceed ``limit`` in magnitude."""
        rows = self.model_layers().values()
        return [r for r in rows if math.isfinite(r["max_abs"]) and r["max_abs"] > limit]


def tensor_stats(name: str, t: torch.Tensor, autocast_dtype: str | None = None) -> TensorStats:
    group, layer = role(name)
    dtype = str(t.dtype).replace("torch.", "")
    stats = TensorStats(name, group, layer, list(t.shape), dtype, t.numel())
    if not (t.is_floating_point() and t.numel()):
        return stats
    s = summarize(t)
    stats.nan, stats.posinf, stats.neginf = s.nan, s.posinf, s.neginf
    if not s.finite:
        flat = int(torch.nonzero(~torch.isfinite(t.reshape(-1)))[0])
        stats.first_nonfinite = [int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape)]
    stats.min, stats.max, stats.mean, stats.std = s.min, s.max, s.mean, s.std
    stats.l2, stats.rms, stats.max_abs = s.l2, s.rms, s.max_abs
    stats.zero_fraction = s.zeros / s.finite_count if s.finite_count else math.nan
    stats.square_overflows_fp32 = s.square_overflows_fp32
    if autocast_dtype in AUTOCAST_DTYPES and group == "model" and s.finite_count:
        limit = torch.finfo(AUTOCAST_DTYPES[autocast_dtype]).max
        stats.beyond_autocast_range = int((t.abs() > limit).sum()) if s.max_abs > limit else 0
    return stats


def role(name: str) -> tuple[str, str]:
    if name.startswith(OPTIM_PREFIX):
        param, _, state_field = name[len(OPTIM_PREFIX) :].rpartition(".")
        return "optimizer", f"{layer_of(param)} {state_field}" if param else state_field
    return "model", layer_of(name.removeprefix(MODEL_PREFIX))


def checkpoint_stats(
    reader: Any,
    autocast_dtype: str | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> CheckpointStats:
    """One pass over the file in name order, so a parameter's two Adam moments arrive together."""
    tensors, adam, moments = [], [], {}
    eps = adam_eps(reader.metadata)
    names = sorted(n for n in reader.names if not n.startswith(RNG_PREFIX))
    for name in names:
        t = reader.get(name)
        if progress:
            progress(name, len(names))
        tensors.append(tensor_stats(name, t, autocast_dtype))
        param, _, state_field = name.removeprefix(OPTIM_PREFIX).rpartition(".")
        if name.startswith(OPTIM_PREFIX) and state_field in ("exp_avg", "exp_avg_sq"):
            moments.setdefault(param, {})[state_field] = t
            if len(moments[param]) == 2:
                pair = moments.pop(param)
                shapes = [list(pair[k].shape) for k in ("exp_avg", "exp_avg_sq")]
                if shapes[0] != shapes[1]:
                    raise DiagError(
                        reader.path,
                        f"{param}: exp_avg {shapes[0]} and exp_avg_sq {shapes[1]} differ",
                    )
                adam.append(adam_row(param, pair, eps))
    return CheckpointStats(str(reader.path), reader.metadata, tensors, layers(tensors), adam)


def layers(tensors: list[TensorStats]) -> list[dict[str, Any]]:
    by_layer: dict[tuple[str, str], list[TensorStats]] = defaultdict(list)
    for t in tensors:
        by_layer[(t.group, t.layer)].append(t)
    rows = []
    for (group, layer), items in by_layer.items():
        finite = [t for t in items if not math.isnan(t.l2)]
        numel = sum(t.numel for t in items)
        l2 = _hypot([t.l2 for t in finite])
        rows.append(
            {
                "group": group,
                "layer": layer,
                "tensors": len(items),
                "numel": numel,
                "nonfinite": sum(t.nonfinite for t in items),
                "l2": l2 if finite else math.nan,
                "rms": l2 / math.sqrt(numel) if finite and numel else math.nan,
                "max_abs": max((t.max_abs for t in finite), default=math.nan),
                "min": min((t.min for t in finite), default=math.nan),
                "max": max((t.max for t in finite), default=math.nan),
                "square_overflows_fp32": any(t.square_overflows_fp32 for t in items),
            }
        )
    return rows


def _hypot(values: list[float]) -> float:
    """sqrt(sum of squares) without overflow: math.hypot scales internally."""
    return math.hypot(*values) if values else 0.0


def adam_row(param: str, moments: dict[str, torch.Tensor], eps: float) -> dict[str, Any]:
    """The largest |exp_avg| / (sqrt(exp_avg_sq) + eps): the scale of Adam's next update."""
    m, v = moments["exp_avg"].double(), moments["exp_avg_sq"].double()
    ratio = m.abs() / (v.clamp_min(0).sqrt() + eps)
    # Non-finite moments are reported by the non-finite rule; a finite m over a zero
    # denominator (eps = 0) stays inf here, which is the blow-up this rule is for.
    ratio = torch.where(torch.isfinite(m) & torch.isfinite(v), ratio, 0.0)
    return {
        "parameter": param,
        "max_ratio": float(ratio.max()),
        "elements_over_limit": int((ratio > ADAM_RATIO_LIMIT).sum()),
        "exp_avg_sq_min": float(v.min()),
        "exp_avg_abs_max": float(m.abs().max()),
    }


def adam_eps(meta: dict[str, str]) -> float:
    try:
        groups = json.loads(meta.get("param_groups", "[]"))
        return float(groups[0].get("eps", 1e-8)) if groups else 1e-8
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError, IndexError):
        return 1e-8
