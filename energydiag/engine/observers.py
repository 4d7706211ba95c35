"""What the instrument watches for. Each observer is small and looks only at the ops it needs.

* ``Origins``: ops whose output gained NaN from NaN-free inputs, or Inf from finite inputs, with
  an explanation registered per op (``@explains``); and masking ops (``where``) that hid
  non-finite values, the forward half of the torch.where gradient trap.
* ``SaturationCounter``: outputs of squashing ops pressed against their limits.
* ``OutputRange``: the range a bounded output can take, propagated from the last squashing op
  through affine ops, so a sigmoid head is found by what it does whatever its module is called.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from energydiag.engine.instrument import FORWARD, OpCall
from energydiag.engine.tensorstats import TensorSummary, all_finite, float_tensors, summarize
from energydiag.schema import Record

SATURATION_EPS = 1e-3
aten = torch.ops.aten

Explain = Callable[[OpCall], dict[str, Any]]
# In-place variants are registered only where the operand explained is read, not written: by the
# time an observer looks, a written operand already holds the result.
EXPLAIN: dict[Any, Explain] = {}
# Every cause an explanation can name in its evidence ("cause": kind): the findings hold one
# account of each, and tests/test_rules.py checks that the two lists are the same.
CAUSES: set[str] = set()


def explains(*packets: Any, causes: tuple[str, ...] = ()) -> Callable[[Explain], Explain]:
    """Register the evidence gathered when one of these ops is where a non-finite value began,
    and the causes (``causes``) that evidence may name when it shows one."""

    def register(fn: Explain) -> Explain:
        for packet in packets:
            if packet in EXPLAIN:  # two explanations of one op: which would win is an accident
                raise ValueError(f"{packet} is already explained by {EXPLAIN[packet].__name__}")
            EXPLAIN[packet] = fn
        CAUSES.update(causes)
        return fn

    return register


def _caused(kind: str, holds: bool) -> dict[str, str]:
    return {"cause": kind} if holds else {}


@dataclass
class OpEvent(Record):
    """An op whose output gained NaN (from NaN-free inputs) or Inf (from finite inputs)."""

    order: int
    op: str
    module: str
    phase: str
    micro_batch: int
    gained: str
    inputs: list[TensorSummary]
    output: TensorSummary
    intentional: bool = False
    detail: dict[str, Any] = field(default_factory=dict)
    autograd_node: str | None = None


class Origins:
    """Every place a non-finite value began, in execution order."""

    def __init__(self) -> None:
        self.events: list[OpEvent] = []
        self.masked: list[OpEvent] = []

    def on_op(self, call: OpCall) -> None:
        outs = float_tensors(call.out)
        if not outs:
            return
        if call.packet is aten.where and call.phase == FORWARD:
            self._note_masking(call, outs)
        elif not all_finite(outs):
            self._note_origin(call, outs)

    def _note_origin(self, call: OpCall, outs: list[torch.Tensor]) -> None:
        out = summarize(_first_nonfinite(outs))
        ins = [summarize(t) for t in float_tensors((call.args, call.kwargs))]
        if call.written_were_finite is not None:  # in place: judge the inputs as they were
            gained = _gained_in_place(call, out, ins)
        elif out.nan and not any(s.nan for s in ins):
            gained = "NaN"
        elif (out.posinf or out.neginf) and all(s.finite for s in ins):
            gained = "Inf"
        else:
            gained = None
        if gained is None:
            return
        explain = EXPLAIN.get(call.packet)
        detail = explain(call) if explain else {}
        intentional = gained == "Inf" and _fills_nonfinite_scalar(call)
        self.events.append(_event(call, gained, ins, out, intentional, detail))

    def _note_masking(self, call: OpCall, outs: list[torch.Tensor]) -> None:
        """torch.where(cond, a, b) whose discarded branch holds NaN/Inf: its gradient will be NaN."""
        branches = float_tensors(call.args[1:])
        if all_finite(outs) and not all_finite(branches):
            hidden = [summarize(t) for t in branches]
            self.masked.append(_event(call, "hidden", hidden, summarize(outs[0]), False, {}))

    def meaningful(self) -> list[OpEvent]:
        """Events that are faults: an intentional -inf fill (an attention mask) is not."""
        return [e for e in self.events if not e.intentional]


def _first_nonfinite(outs: list[torch.Tensor]) -> torch.Tensor:
    """The output worth describing: for a foreach op, the first tensor that is non-finite."""
    return next((t for t in outs if not all_finite([t])), outs[0])


def _gained_in_place(call: OpCall, out: TensorSummary, ins: list[TensorSummary]) -> str | None:
    """An in-place op whose written inputs were finite and now are not; the other inputs (read
    only) are judged as they are, since the op did not change them."""
    if not call.written_were_finite:
        return None
    written = {id(t) for t in float_tensors(call.args[:1])}
    read = [
        s
        for t, s in zip(float_tensors((call.args, call.kwargs)), ins, strict=False)
        if id(t) not in written
    ]
    if not all(s.finite for s in read):
        return None
    return "NaN" if out.nan else "Inf"


def _event(call: OpCall, gained, ins, out, intentional, detail) -> OpEvent:
    return OpEvent(
        call.order,
        call.name,
        call.module,
        call.phase,
        call.micro_batch,
        gained,
        ins,
        out,
        intentional,
        detail,
        call.autograd_node,
    )


def _fills_nonfinite_scalar(call: OpCall) -> bool:
    """masked_fill(x, mask, -inf), full(..., -inf): the value was asked for, not computed."""
    for arg in (*call.args, *call.kwargs.values()):
        if isinstance(arg, float) and not math.isfinite(arg):
            return True
        if isinstance(arg, torch.Tensor) and arg.dim() == 0 and not bool(torch.isfinite(arg)):
            return True
    return False


def _first_index(mask: torch.Tensor) -> list[int] | None:
    hits = torch.nonzero(mask)
    return hits[0].tolist() if len(hits) else None


@explains(aten.log, aten.log2, aten.log10, aten.log1p, causes=("log_of_nonpositive",))
def _log(call: OpCall) -> dict[str, Any]:
    x = call.args[0].detach()
    limit = -1 if call.packet is aten.log1p else 0
    zeros, negatives = int((x == limit).sum()), int((x < limit).sum())
    return {
        "zero_inputs": zeros,
        "negative_inputs": negatives,
        "first_bad_index": _first_index(x <= limit),
    } | _caused("log_of_nonpositive", bool(zeros or negatives))


@explains(aten.sqrt, aten.rsqrt, causes=("sqrt",))
def _sqrt(call: OpCall) -> dict[str, Any]:
    x = call.args[0].detach()
    return {
        "zero_inputs": int((x == 0).sum()),
        "negative_inputs": int((x < 0).sum()),
        "first_bad_index": _first_index(x <= 0 if call.packet is aten.rsqrt else x < 0),
        "cause": "sqrt",
    }


@explains(aten.div, aten.div_, causes=("zero_denominator",))
def _div(call: OpCall) -> dict[str, Any]:
    den = torch.as_tensor(call.args[1])
    zeros = int((den == 0).sum())
    return {"zero_denominators": zeros, "first_bad_index": _first_index(den == 0)} | _caused(
        "zero_denominator", zeros > 0
    )


@explains(
    aten.addcdiv,
    aten.addcdiv_,
    aten._foreach_addcdiv,
    aten._foreach_addcdiv_,
    causes=("zero_denominator",),
)
def _addcdiv(call: OpCall) -> dict[str, Any]:
    """x + v * a / b: Adam's update, whose denominator is sqrt(exp_avg_sq) + eps."""
    dens = call.args[2] if len(call.args) > 2 else call.kwargs.get("tensor2")
    dens = dens if isinstance(dens, list | tuple) else [dens]
    zeros = sum(int((d == 0).sum()) for d in dens if isinstance(d, torch.Tensor))
    return {"zero_denominators": zeros} | _caused("zero_denominator", zeros > 0)


@explains(aten.std, aten.var, aten.std_mean, aten.var_mean, causes=("no_degrees_of_freedom",))
def _spread(call: OpCall) -> dict[str, Any]:
    """std/var with correction 1 over one element divides by zero degrees of freedom."""
    x = call.args[0]
    dims = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else dims
    reduced = math.prod(x.shape[d] for d in dims) if dims else x.numel()
    correction = call.kwargs.get("correction", 1)
    return {"elements_reduced": int(reduced), "correction": correction} | _caused(
        "no_degrees_of_freedom", reduced - correction <= 0
    )


@explains(aten._to_copy, aten.copy_, causes=("narrowing_cast",))
def _cast(call: OpCall) -> dict[str, Any]:
    """A narrowing cast: values beyond the target dtype's range become Inf."""
    source = call.args[1] if call.packet is aten.copy_ else call.args[0]
    target = call.out.dtype if isinstance(call.out, torch.Tensor) else None
    info = torch.finfo(target) if target is not None and target.is_floating_point else None
    peak = summarize(source).max_abs
    return {
        "from_dtype": str(source.dtype).replace("torch.", ""),
        "to_dtype": str(target).replace("torch.", ""),
        "dtype_max": info.max if info else None,
        "largest_input": peak,
    } | _caused("narrowing_cast", info is not None and peak > info.max)


@explains(
    aten.exp, aten.pow, aten.mul, aten.addmm, aten.mm, aten.bmm, aten.matmul, causes=("overflow",)
)
def _overflow(call: OpCall) -> dict[str, Any]:
    peaks = [summarize(t).max_abs for t in float_tensors(call.args)]
    out = call.out if isinstance(call.out, torch.Tensor) else None
    limit = torch.finfo(out.dtype).max if out is not None else None
    return {"largest_input": max(peaks, default=math.nan), "dtype_max": limit} | _caused(
        "overflow", limit is not None
    )


@explains(aten.linalg_vector_norm, aten.norm, aten._foreach_norm, causes=("norm_overflow",))
def _norm(call: OpCall) -> dict[str, Any]:
    tensors = float_tensors(call.args[0])
    peak = max((summarize(t).max_abs for t in tensors), default=math.nan)
    limit = math.sqrt(torch.finfo(torch.float32).max)
    return {"largest_input": peak, "square_limit": limit, "cause": "norm_overflow"}


@explains(
    aten.native_layer_norm,
    aten.native_group_norm,
    aten.native_batch_norm,
    causes=("variance_overflow",),
)
def _normalisation(call: OpCall) -> dict[str, Any]:
    """A normalisation squares its (finite) inputs: past sqrt(dtype max) the variance is Inf."""
    x = call.args[0].detach()
    peak, limit = summarize(x).max_abs, math.sqrt(torch.finfo(x.dtype).max)
    return {
        "largest_input": peak,
        "variance_limit": limit,
        "dtype": str(x.dtype).replace("torch.", ""),
    } | _caused("variance_overflow", peak > limit)


@explains(aten._softmax, aten._log_softmax)
def _masked_rows(call: OpCall) -> dict[str, Any]:
    """Rows of a softmax input that are -inf everywhere: every key masked."""
    x, dim = call.args[0].detach(), call.args[1]
    return {
        "rows_all_neg_inf": int((x == -torch.inf).all(dim=dim).sum()),
        "rows": x.numel() // max(x.shape[dim], 1),
    }


@dataclass
class Saturation:
    module: str
    op: str
    total: int = 0
    saturated: int = 0

    @property
    def fraction(self) -> float:
        return self.saturated / self.total if self.total else 0.0


def _softplus_saturated(call: OpCall) -> torch.Tensor:
    """softplus'(x) = sigmoid(beta·x): below 1e-3 the gradient has all but vanished."""
    x = call.args[0].detach()
    beta = call.args[1] if len(call.args) > 1 else call.kwargs.get("beta", 1.0)
    return torch.sigmoid(beta * x) < SATURATION_EPS


SATURATING: dict[Any, Callable[[OpCall], torch.Tensor]] = {
    aten.sigmoid: lambda c: (c.out < SATURATION_EPS) | (c.out > 1 - SATURATION_EPS),
    aten.tanh: lambda c: c.out.abs() > 1 - SATURATION_EPS,
    aten.softplus: _softplus_saturated,
    # A softmax row that has collapsed to one-hot: its gradient vanishes like a sigmoid's.
    aten._softmax: lambda c: c.out.amax(dim=c.args[1]) > 1 - SATURATION_EPS,
}


class SaturationCounter:
    """Forward outputs of sigmoid/tanh/softplus within 1e-3 of where their gradient vanishes,
    and softmax rows collapsed to one-hot (counted per row)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], Saturation] = {}

    def on_op(self, call: OpCall) -> None:
        rule = SATURATING.get(call.packet)
        if rule is None or call.phase != FORWARD or not isinstance(call.out, torch.Tensor):
            return
        key = (call.module, call.name)
        entry = self.counts.setdefault(key, Saturation(*key))
        hits = rule(call)
        entry.total += hits.numel()
        entry.saturated += int(hits.sum())

    def rows(self) -> list[Saturation]:
        return list(self.counts.values())


# --- the range of a bounded output -------------------------------------------------------------

Bounds = tuple[float, float]
_SQUASH: dict[Any, Callable[[OpCall], Bounds]] = {
    aten.sigmoid: lambda c: (0.0, 1.0),
    aten.tanh: lambda c: (-1.0, 1.0),
    aten.hardtanh: lambda c: (_arg(c, 1, "min_val", -1.0), _arg(c, 2, "max_val", 1.0)),
    aten.clamp: lambda c: (_arg(c, 1, "min", -math.inf), _arg(c, 2, "max", math.inf)),
}
# Ops whose output stays within the range of their (tracked) input.
_RANGE_KEEPING = {aten.mean, aten.clone, aten._to_copy, aten.amax, aten.amin, aten.squeeze}


def _arg(call: OpCall, index: int, name: str, default: float) -> float:
    value = call.args[index] if len(call.args) > index else call.kwargs.get(name)
    return default if value is None else float(value)


class OutputRange:
    """Follows the output of every squashing op through affine arithmetic (x*s, x+s, mean...).

    After a forward, ``bounds_of(output)`` is the range the squashing op and what followed allow,
    and ``source`` names that op and its module: the bounded energy head, found by what it does.
    """

    def __init__(self) -> None:
        self._ranges: dict[int, tuple[torch.Tensor, Bounds, str]] = {}
        self.modules: dict[str, str] = {}  # source -> the module of its squashing op

    def on_op(self, call: OpCall) -> None:
        if call.phase != FORWARD or not isinstance(call.out, torch.Tensor):
            return
        squash = _SQUASH.get(call.packet)
        if squash is not None:
            source = f"{call.name} in '{call.module}'"
            self.modules[source] = call.module
            self._keep(call.out, squash(call), source)
            return
        derived = self._propagate(call)
        if derived is not None:
            self._keep(call.out, *derived)

    def bounds_of(self, tensor: torch.Tensor) -> tuple[Bounds, str] | None:
        entry = self._ranges.get(_key(tensor))
        return (entry[1], entry[2]) if entry else None

    def _keep(self, out: torch.Tensor, bounds: Bounds, source: str) -> None:
        self._ranges[_key(out)] = (out, bounds, source)

    def _propagate(self, call: OpCall) -> tuple[Bounds, str] | None:
        tracked = [self._ranges.get(_key(a)) for a in call.args if isinstance(a, torch.Tensor)]
        known = [t for t in tracked if t is not None]
        if not known:
            return None
        (lo, hi), source = known[0][1], known[0][2]
        if call.packet in _RANGE_KEEPING:
            return (lo, hi), source
        other = call.args[1] if len(call.args) > 1 else None
        scalar = _scalar(other)
        if scalar is None:
            return None
        if call.packet in (aten.add, aten.sub):
            alpha = call.kwargs.get("alpha", 1)
            shift = scalar * alpha * (1 if call.packet is aten.add else -1)
            return (lo + shift, hi + shift), source
        if call.packet is aten.mul:
            ends = sorted((lo * scalar, hi * scalar))
            return (ends[0], ends[1]), source
        return None


def _key(t: torch.Tensor) -> int:
    """Views share storage and offset with what they view: key by both, so a view is found."""
    return hash((t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()))


def _scalar(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
        return float(value)
    return None
