"""What the instrument watches for. Each observer is small and looks only at the ops it needs.

* ``Origins``: ops whose output gained NaN from NaN-free inputs, or Inf from finite inputs, with
  the evidence ``engine.explanations`` registers per op; and masking ops (``where``) that hid
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

from energydiag.engine.explanations import EXPLAIN
from energydiag.engine.instrument import FORWARD, OpCall
from energydiag.engine.tensorstats import TensorSummary, all_finite, float_tensors, summarize
from energydiag.schema import Record

SATURATION_EPS = 1e-3
aten = torch.ops.aten


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

    reads_written_before = True  # an in-place op is judged by the inputs it overwrote

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
