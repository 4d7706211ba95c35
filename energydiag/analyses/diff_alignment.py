"""Pairing two sides' fingerprints: by key, then by statistics; what stays unpaired is reported
in stretches, not hidden.

By key first: phase, module, op and occurrence, the same op on both sides (as many elements in
each output, or the key was shifted by an op only one side runs). What is left pairs by
statistics: within one phase and module (the backward's module aside, as in the key), an entry
of A with the next entry of B that has as many elements per output and fingerprints within
``close`` of A's. That is one value computed by other ops: a fused ``addmm`` against ``mm`` and
``add``, an op another torch version decomposes. Pairs by statistics keep execution order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from energydiag.engine.fingerprint import OpPrint
from energydiag.engine.instrument import BACKWARD

CLOSE = 1e-3  # pairing by statistics: one value computed by other ops agrees this closely
STRETCHES = 10  # unpaired stretches listed per side
SHOWN = 6  # op names shown per stretch


@dataclass
class Pair:
    a: OpPrint
    b: OpPrint
    by: str  # "key" or "statistics"


@dataclass
class Alignment:
    pairs: list[Pair]  # in A's execution order
    unpaired_a: list[OpPrint]
    unpaired_b: list[OpPrint]

    @property
    def by_statistics(self) -> int:
        return sum(pair.by == "statistics" for pair in self.pairs)

    def stretches(self) -> list[dict[str, Any]]:
        return _stretches(self.unpaired_a, "a") + _stretches(self.unpaired_b, "b")


def align(prints_a: list[OpPrint], prints_b: list[OpPrint], close: float) -> Alignment:
    by_key = {p.key: p for p in prints_b}
    pairs = [Pair(pa, by_key[pa.key], "key") for pa in prints_a if _same_op(pa, by_key)]
    keyed = {id(pair.a) for pair in pairs}
    left_a = [pa for pa in prints_a if id(pa) not in keyed]
    keyed = {id(pair.b) for pair in pairs}
    left_b = [pb for pb in prints_b if id(pb) not in keyed]
    found = _by_statistics(left_a, left_b, close)
    paired_a, paired_b = {id(p.a) for p in found}, {id(p.b) for p in found}
    return Alignment(
        sorted(pairs + found, key=lambda pair: pair.a.index),
        [pa for pa in left_a if id(pa) not in paired_a],
        [pb for pb in left_b if id(pb) not in paired_b],
    )


def _same_op(pa: OpPrint, by_key: dict) -> bool:
    """A key pairs the k-th run of one op; an op that only B runs (a split matmul's second
    ``mm``) shifts B's later occurrences, and the pair it makes holds another count of elements."""
    pb = by_key.get(pa.key)
    return pb is not None and _sized_alike(pa, pb)


def _sized_alike(pa: OpPrint, pb: OpPrint) -> bool:
    """As many elements per output; fingerprints stored before the counts were kept (a
    numerics baseline from an earlier version) have none, and pair as they always did."""
    return not pa.numels or not pb.numels or pa.numels == pb.numels


def close_for(tolerance: float) -> float:
    """Across a dtype change the values are apart by up to the tolerance anyway."""
    return max(CLOSE, 8 * tolerance)


def relative(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest relative difference between two ops' output fingerprints: of the norms, and
    of the sums against |sum| + norm (a sum near zero cancels; its norm does not)."""
    if len(a) != len(b):
        return float("inf")
    gaps = [0.0]
    for (norm_a, sum_a), (norm_b, sum_b) in zip(a, b, strict=True):
        scale = max(abs(norm_a), abs(norm_b), 1e-300)
        gaps += [abs(norm_a - norm_b) / scale, abs(sum_a - sum_b) / (scale + abs(sum_a))]
    return max(gaps)


def _by_statistics(left_a: list[OpPrint], left_b: list[OpPrint], close: float) -> list[Pair]:
    waiting: dict[tuple[str, str], list[OpPrint]] = {}
    for pb in left_b:
        waiting.setdefault(_where(pb), []).append(pb)
    pairs = []
    for pa in left_a:
        candidates = waiting.get(_where(pa), [])
        for i, pb in enumerate(candidates):
            if _sized_alike(pa, pb) and relative(pa.outputs, pb.outputs) <= close:
                pairs.append(Pair(pa, pb, "statistics"))
                del candidates[: i + 1]  # order kept: B's skipped entries stay unpaired
                break
    return pairs


def _where(p: OpPrint) -> tuple[str, str]:
    return p.phase, "" if p.phase == BACKWARD else p.module


def _stretches(entries: list[OpPrint], side: str) -> list[dict[str, Any]]:
    """Consecutive unpaired entries of one side, in one phase and module."""
    runs: list[dict[str, Any]] = []
    last = -2
    for e in entries:
        run = runs[-1] if runs else None
        if run and e.index == last + 1 and (e.phase, e.module) == (run["phase"], run["module"]):
            run["ops"].append(e.op)
        else:
            runs.append({"side": side, "phase": e.phase, "module": e.module, "ops": [e.op]})
        last = e.index
    return [run | {"count": len(run["ops"]), "ops": run["ops"][:SHOWN]} for run in runs][:STRETCHES]
