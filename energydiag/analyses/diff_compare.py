"""Comparing two sides' paired fingerprints: the first pair apart beyond the tolerance, which of
its inputs differ (a weight, named, or an activation), and the largest difference per module;
after the step, the most different parameter, and across ranks all gradients together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from energydiag.analyses.diff_alignment import Pair, relative
from energydiag.engine.fingerprint import Key, OpPrint, key_of
from energydiag.schema import Record


@dataclass
class OpDifference(Record):
    phase: str
    module: str
    op: str
    occurrence: int
    a: list[list[float]]  # per output: [norm, sum]
    b: list[list[float]]
    relative: float
    inputs_matched: bool
    differing_inputs: list[str] = field(default_factory=list)  # "weight 'l1.weight'", "input 0"
    shadow: dict[str, Any] | None = None  # the float64 re-run of this op on each side's inputs
    paired_by: str = "key"  # or "statistics": B computed the value with another op
    b_op: str = ""  # B's op and occurrence when paired by statistics
    b_occurrence: int = 0
    micro_batch: int | None = None  # A's, where its ops were fingerprinted
    step: int | None = None  # the report's, for a reader of this object alone

    def keys(self) -> tuple[Key, Key]:
        """Each side's key of this op (another op on B when paired by statistics)."""
        key_a = key_of(self.phase, self.module, self.op, self.occurrence)
        if self.paired_by == "key":
            return key_a, key_a
        return key_a, key_of(self.phase, self.module, self.b_op, self.b_occurrence)


def compare(
    pairs: list[Pair], tol: float, outside: str
) -> tuple[OpDifference | None, list[dict[str, Any]]]:
    """``outside`` names path "": ops outside every module, or (by module) the model itself."""
    first, modules = None, {}
    for pair in pairs:
        pa, pb = pair.a, pair.b
        gap = relative(pa.outputs, pb.outputs)
        worst = modules.setdefault(pa.module or outside, {"largest": 0.0, "op": ""})
        if gap > worst["largest"]:
            worst.update(largest=gap, op=pa.op, phase=pa.phase)
        if first is None and (gap > tol or pa.bits != pb.bits):
            first = _difference(pair, gap, tol)
    return first, [{"module": m, **v} for m, v in modules.items()]


def _difference(pair: Pair, gap: float, tol: float) -> OpDifference:
    """Which of the op's inputs differ between the sides: a weight, or an activation."""
    pa, pb = pair.a, pair.b
    bitwise = bool(pa.input_bits)
    # By statistics the two ops take different inputs, which cannot be compared one by one;
    # every pair before this one agreed, so what fed it did too.
    comparable = pair.by == "key"
    apart = [
        (i, name)
        for i, (x, y, name) in enumerate(zip(pa.inputs, pb.inputs, pa.parameters, strict=False))
        if comparable and (relative([x], [y]) > tol or (bitwise and _unequal(pa, pb, i)))
    ]
    differing = [f"weight {name!r}" if name else f"input {i}" for i, name in apart]
    return OpDifference(
        pa.phase,
        pa.module,
        pa.op,
        pa.occurrence,
        pa.outputs,
        pb.outputs,
        gap,
        all(name for _, name in apart),  # only weights differ, no activation
        differing,
        paired_by=pair.by,
        b_op=pb.op if pair.by == "statistics" else "",
        b_occurrence=pb.occurrence if pair.by == "statistics" else 0,
        micro_batch=pa.micro_batch,
    )


def differ(inputs: list[str]) -> str:
    """``weight 'l1.weight' differs``, ``input 0, input 1 differ``."""
    return ", ".join(inputs) + (" differs" if len(inputs) == 1 else " differ")


def _unequal(pa: OpPrint, pb: OpPrint, i: int) -> bool:
    return i >= len(pb.input_bits) or pa.input_bits[i] != pb.input_bits[i]


def parameter_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    gaps = {
        name: float((a[name] - b[name]).abs().max() / a[name].abs().max().clamp_min(1e-300))
        for name in a
        if name in b and a[name].shape == b[name].shape
    }
    name = max(gaps, key=gaps.get, default=None)
    return {"most_different": name, "relative": gaps.get(name, 0.0) if name else 0.0}


def gradient_gap(
    a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None
) -> float | None:
    if a is None or b is None or a.keys() != b.keys():
        return None
    apart = sum(float((a[n] - b[n]).square().sum()) for n in a)
    scale = sum(float(a[n].square().sum()) for n in a)
    return (apart / scale) ** 0.5 if scale else float(apart > 0)
