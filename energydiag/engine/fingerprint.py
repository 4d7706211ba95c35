"""Per-op fingerprints of one replayed step, for comparing two executions op by op.

Each op's float outputs are reduced on the device to a float64 L2 norm and sum, cast to
float64 a chunk at a time (``reduce64``) and read back once at the end: no sync per op. Its
inputs are not reduced again: an input an earlier op produced carries that output's
fingerprint, and only leaf inputs (parameters, the batch, optimizer state) are reduced, once per
version of their data.

An op is keyed by its phase, module, op name and occurrence (the k-th time that op ran in that
module and phase), which pairs the same op across two executions even when other ops differ in
between. In the backward the module is shown but not part of the key: which module a backward
op is credited to varies from process to process where branches meet, while the engine's order
of the ops does not. Inputs that are parameters (or views of one) are named, so a difference
that comes in through a weight is told from one that comes in through an activation.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from energydiag.engine.instrument import BACKWARD, OpCall
from energydiag.engine.tensorstats import plain, tensors_in
from energydiag.schema import Record

Key = tuple[str, str, str, int]  # phase, module ("" in the backward), op, occurrence


@dataclass
class OpPrint(Record):
    index: int  # execution order among the fingerprinted ops
    phase: str
    module: str
    op: str
    occurrence: int
    outputs: list[list[float]] = field(default_factory=list)  # per float output: [norm, sum]
    inputs: list[list[float]] = field(default_factory=list)  # per float input, as it was read
    parameters: list[str] = field(default_factory=list)  # per input: its parameter, or ""
    bits: list[int] = field(default_factory=list)  # per output: its checksum (bitwise only)
    input_bits: list[int] = field(default_factory=list)  # per input
    numels: list[int] = field(default_factory=list)  # per output: its elements (to pair by)

    @property
    def key(self) -> Key:
        return key_of(self.phase, self.module, self.op, self.occurrence)


class Played(NamedTuple):
    """One side's step: its fingerprints, its loss, the parameters after it and, where the
    gradients are what is compared, the gradients it left (float64, on the CPU)."""

    prints: list[OpPrint]
    loss: float
    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] | None = None


def key_of(phase: str, module: str, op: str, occurrence: int) -> Key:
    return (phase, "" if phase == BACKWARD else module, op, occurrence)


class Fingerprints:
    """An observer: every op's fingerprint, in execution order; with ``bitwise``, also a
    checksum of every bit of each tensor, which tells apart what a norm and a sum cannot (two
    values swapped, a change below float64's resolution of the sum)."""

    def __init__(self, model: nn.Module, bitwise: bool = False) -> None:
        self.bitwise = bitwise
        self.checksums: list[torch.Tensor] = []  # per slot, 0-d int64 on the device
        self.params = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}
        self.seen: Counter[tuple[str, str, str]] = Counter()
        # (data pointer, version) -> the slot of its fingerprint: an op's output, or a leaf
        self.known: dict[tuple[int, int], int] = {}
        self.norms: list[torch.Tensor] = []  # per slot, 0-d float64 on the device
        self.sums: list[torch.Tensor] = []
        self.scratch = torch.empty(CHUNK, dtype=torch.float64)  # reduce64's, on the CPU
        self.entries: list[tuple[OpPrint, list[int], list[int]]] = []

    def on_op(self, call: OpCall) -> None:
        outs = _floats(call.out)
        if not outs:
            return
        where = key_of(call.phase, call.module, call.name, 0)[:3]
        self.seen[where] += 1
        entry = OpPrint(len(self.entries), call.phase, call.module, call.name, self.seen[where])
        ins = _floats((call.args, call.kwargs))
        entry.parameters = [self.params.get(t.untyped_storage().data_ptr(), "") for t in ins]
        entry.numels = [t.numel() for t in outs]
        in_slots = [self._known(t) for t in ins]
        out_slots = [self._slot(t) for t in outs]
        for t, slot in zip(outs, out_slots, strict=True):
            self.known[(t.data_ptr(), t._version)] = slot
        self.entries.append((entry, out_slots, in_slots))

    def prints(self) -> list[OpPrint]:
        """Read every reduction back at once."""
        if not self.norms:
            return []
        device = self.norms[0].device
        norms, sums = (torch.stack([t.to(device) for t in ts]) for ts in (self.norms, self.sums))
        flat = torch.stack([norms, sums], dim=1).tolist()
        bits = torch.stack([t.to(device) for t in self.checksums]).tolist() if self.bitwise else []
        for entry, outs, ins in self.entries:
            entry.outputs = [flat[i] for i in outs]
            entry.inputs = [flat[i] for i in ins]
            if bits:
                entry.bits, entry.input_bits = [bits[i] for i in outs], [bits[i] for i in ins]
        return [entry for entry, _, _ in self.entries]

    def _known(self, t: torch.Tensor) -> int:
        """An input's slot: the output it is, else a leaf reduced once per version of its data.
        (A view whose data pointer is not an output's is reduced as a leaf.)"""
        where = (t.data_ptr(), t._version)
        if where not in self.known:
            self.known[where] = self._slot(t)
        return self.known[where]

    def _slot(self, t: torch.Tensor) -> int:
        scratch = self.scratch if t.device.type == "cpu" else None
        norm, total = reduce64(t, scratch)
        self.norms.append(norm)
        self.sums.append(total)
        if self.bitwise:
            self.checksums.append(checksum(t, scratch))
        return len(self.norms) - 1


CHUNK = 1 << 16  # elements widened at once on the CPU (512 KiB as float64 or int64)
METHOD = 2  # stored with numerics baselines: 1 reduced whole tensors, 2 reduces by CHUNK


def reduce64(
    t: torch.Tensor, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 L2 norm and sum of a tensor's elements. On the CPU a float64 reduction of
    float32 data first casts a whole copy, once per reduction; this casts once per chunk, into
    ``scratch`` (CHUNK float64 elements, reused: a fresh copy each time is fresh pages to fault
    in), so the fingerprints' extra memory is one chunk, not copies of the largest tensor."""
    norms, sums = [], []
    for part in _chunks(t):
        d = part.to(torch.float64) if scratch is None else scratch[: part.numel()].copy_(part)
        norms.append(torch.linalg.vector_norm(d))
        sums.append(d.sum())
    if len(norms) == 1:
        return norms[0], sums[0]
    return torch.linalg.vector_norm(torch.stack(norms)), torch.stack(sums).sum()


WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def checksum(t: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Each element's bits as an integer, weighted by an odd number per position (so a
    permutation changes it too), summed with int64 wrap-around; on the device, no sync. A
    chunk's weights are ``first + 2i``, summed as ``first * sum(w) + 2 * sum(i * w)``: int64
    wraps the same in any grouping, and the words are widened into ``scratch`` (reduce64's,
    as int64)."""
    total, first = None, 1  # the weight of the chunk's first element
    for part in _chunks(t):
        n, ints = part.numel(), part.view(WORDS[t.element_size()])
        wide = torch.empty(n, dtype=torch.int64, device=t.device) if scratch is None else scratch
        words = wide.view(torch.int64)[:n].copy_(ints)  # a copy (scratch is float64's bytes)
        positions = _positions()[:n] if t.device.type == "cpu" else torch.arange(n, device=t.device)
        part_sum = words.sum() * first + words.mul_(positions).sum() * 2
        total = part_sum if total is None else total + part_sum
        first += 2 * n
    return total


@functools.cache
def _positions() -> torch.Tensor:
    return torch.arange(CHUNK)


def _chunks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensor's elements in order, flat and contiguous, in CHUNK pieces on the CPU; on other
    devices a chunk costs kernel launches and saves no cache, so there is one."""
    flat = t.detach().reshape(-1)
    return flat.split(CHUNK) if t.device.type == "cpu" and flat.numel() > CHUNK else (flat,)


def _floats(obj: object) -> list[torch.Tensor]:
    return [plain(t) for t in tensors_in(obj) if t.is_floating_point() and t.numel()]
