"""Per-op fingerprints of one replayed step, for comparing two executions op by op.

Each op's float outputs are reduced on the device to a float64 L2 norm and sum
(``engine/reductions.py``) and read back once at the end: no sync per op. Its inputs are not
reduced again: an input an earlier op produced carries that output's fingerprint, and only leaf
inputs (parameters, the batch, optimizer state) are reduced, once per version of their data
(``engine/slots.py``); what an in-place op writes is reduced before it runs, as it reads it. An
op that only copies a contiguous input (``clone``, ``_unsafe_view``, a ``_to_copy`` that
keeps the dtype) carries its input's fingerprint too: on the benchmark step a fifth of the
elements are outputs of these ops, and half of those copy a contiguous input.

An op is keyed by its phase, module, op name and occurrence (the k-th time that op ran in that
module and phase), which pairs the same op across two executions even when other ops differ in
between. In the backward the module is shown but not part of the key: which module a backward
op is credited to varies from process to process where branches meet, while the engine's order
of the ops does not. Inputs that are parameters (or views of one) are named, so a difference
that comes in through a weight is told from one that comes in through an activation.

Given ``phases``, only ops of those phases are fingerprinted: `diff` watches every step at
module outputs first (``engine/module_prints.py``) and then names the op in the one phase where
the sides came apart. An op's occurrence counts only its own phase's ops, so it is the same
either way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from energydiag.engine.instrument import BACKWARD, OpCall, written
from energydiag.engine.slots import Slots
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
    # A backward pass ends a micro-batch: ops after one are a later micro-batch's forward. None
    # after the last (the clip, the optimizer), and where the watch's hooks, which keep no
    # count, saw the entry.
    micro_batch: int | None = None

    @property
    def key(self) -> Key:
        return key_of(self.phase, self.module, self.op, self.occurrence)


class Played(NamedTuple):
    """One side's step: its fingerprints, its loss, the parameters after it and, where the
    gradients are what is compared, the gradients it left (float64, on the CPU); the ops it
    kept for a float64 re-run, by key: the op and its args, kwargs and output as copied."""

    prints: list[OpPrint]
    loss: float
    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] | None = None
    kept: dict[Key, tuple[Any, tuple[Any, Any, Any]]] = {}


def key_of(phase: str, module: str, op: str, occurrence: int) -> Key:
    return (phase, "" if phase == BACKWARD else module, op, occurrence)


class Fingerprints:
    """An observer: every op's fingerprint, in execution order; with ``bitwise``, also a
    checksum of every bit of each tensor, which tells apart what a norm and a sum cannot (two
    values swapped, a change below float64's resolution of the sum)."""

    def __init__(
        self, model: nn.Module, bitwise: bool = False, phases: frozenset[str] | None = None
    ) -> None:
        self.bitwise, self.phases = bitwise, phases
        self.params = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}
        self.seen: Counter[tuple[str, str, str]] = Counter()
        # What an in-place op wrote, keyed once the op has returned: the autograd layer above
        # the dispatch mode bumps the version after the mode has seen the op.
        self.unsettled: list[tuple[torch.Tensor, int]] = []
        self.slots = Slots(bitwise)  # an op's output, or a leaf, by the tensor it was taken of
        self.reductions = self.slots.reductions
        self.entries: list[tuple[OpPrint, list[int], list[int]]] = []
        self.micro_batches = 0  # seen to end in a backward pass

    def before_write(self, func: Any, args: tuple, kwargs: dict, phase: str) -> None:
        """What an in-place op is about to write, reduced while it holds what the op reads (a
        leaf seen first when the op has run, as optimizer state is, would be read as written)."""
        if self.phases is None or phase in self.phases:
            self._settle()
            for t in _floats(written(func, args, kwargs)):
                self.slots.of(t)

    def on_op(self, call: OpCall) -> None:
        self._settle()
        if call.phase == BACKWARD:
            self.micro_batches = max(self.micro_batches, call.micro_batch)
        if self.phases is not None and call.phase not in self.phases:
            self.slots.forget()
            return
        mutable = call.mutable
        outs = _outputs(call, mutable)
        if not outs:
            return
        where = key_of(call.phase, call.module, call.name, 0)[:3]
        self.seen[where] += 1
        entry = OpPrint(
            len(self.entries),
            call.phase,
            call.module,
            call.name,
            self.seen[where],
            micro_batch=call.micro_batch,
        )
        ins = _floats((call.args, call.kwargs))
        entry.parameters = [self.params.get(t.untyped_storage().data_ptr(), "") for t in ins]
        entry.numels = [t.numel() for t in outs]
        in_slots = [self.slots.of(t) for t in ins]
        copied = self._copied(call.name, ins, in_slots, outs)
        out_slots = [self.reductions.add(t) for t in outs] if copied is None else [copied]
        for t, slot in zip(outs, out_slots, strict=True):
            if mutable:
                self.unsettled.append((t, slot))
            else:
                self.slots.remember(t, slot)
        self.entries.append((entry, out_slots, in_slots))

    def _settle(self) -> None:
        """Key what the last in-place op wrote by the version it now has."""
        for t, slot in self.unsettled:
            self.slots.remember(t, slot)
        self.unsettled.clear()

    def prints(self) -> list[OpPrint]:
        """Read every reduction back at once."""
        flat, bits = self.reductions.read()
        for entry, outs, ins in self.entries:
            if entry.micro_batch > self.micro_batches:
                entry.micro_batch = None  # after the last backward pass
            entry.outputs = [flat[i] for i in outs]
            entry.inputs = [flat[i] for i in ins]
            if bits:
                entry.bits, entry.input_bits = [bits[i] for i in outs], [bits[i] for i in ins]
        return [entry for entry, _, _ in self.entries]

    def _copied(
        self, op: str, ins: list[torch.Tensor], in_slots: list[int], outs: list[torch.Tensor]
    ) -> int | None:
        """The slot of the input an op only copies, when that slot holds these very elements:
        contiguous from the same address, as many, of one dtype (a slice that starts where its
        base does shares the base's slot, and must not lend it)."""
        if op not in COPIES or len(outs) != 1 or not ins:
            return None
        src, out, slot = ins[0], outs[0], in_slots[0]
        alike = (
            src.dtype == out.dtype and src.numel() == out.numel() == self.reductions.numels[slot]
        )
        return slot if alike and src.is_contiguous() else None


COPIES = frozenset({"aten::clone", "aten::_unsafe_view", "aten::_to_copy"})


def _outputs(call: OpCall, mutable: bool) -> list[torch.Tensor]:
    """An op's float outputs; for an in-place op that returns nothing (``_foreach_mul_``, as
    ``clip_grad_norm_`` scales the gradients with it), what it wrote."""
    outs = _floats(call.out)
    if outs or not mutable:
        return outs
    return _floats(written(call.func, call.args, call.kwargs))


def _floats(obj: object) -> list[torch.Tensor]:
    return [plain(t) for t in tensors_in(obj) if t.is_floating_point() and t.numel()]
