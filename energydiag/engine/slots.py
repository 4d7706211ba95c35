"""Which fingerprint a tensor already has, so that one tensor read many times is reduced once.

A tensor is known by its data pointer and version (bumped by every in-place write). That pair
alone is not an identity: memory is freed and handed out again, and a tensor made where a freed
one was (a ``torch.tensor(0.0)``, as Adam's step counts are) starts at the same version. So the
tensor that owns the memory is held weakly beside its slot, and a slot whose owner is gone is no
one's. A view is its base only when it holds as many elements from the same address (a
transpose); an expanded scalar or a leading slice is reduced on its own, as it is read.
"""

from __future__ import annotations

import weakref

import torch

from energydiag.engine.reductions import Reductions


class Slots:
    """A step's reductions (``engine/reductions.py``) with the tensors they were taken of."""

    def __init__(self, bitwise: bool = False) -> None:
        self.reductions = Reductions(bitwise)
        self.known: dict[tuple[int, int], tuple[int, weakref.ref]] = {}

    def of(self, t: torch.Tensor) -> int:
        """``t``'s slot: the one it already has as it is now, else a new one."""
        held = self.known.get((t.data_ptr(), t._version))
        alive = held is not None and held[1]() is not None
        if alive and self.reductions.numels[held[0]] == t.numel():
            return held[0]
        slot = self.reductions.add(t)
        if not alive:
            self.remember(t, slot)
        return slot

    def remember(self, t: torch.Tensor, slot: int) -> None:
        """``t`` as it is now has the fingerprint in ``slot`` (an op's output, a copy's input)."""
        owner = t if t._base is None else t._base
        self.known[(t.data_ptr(), t._version)] = (slot, weakref.ref(owner))

    def forget(self) -> None:
        """Unwatched ops ran: what an address held is not known any more."""
        self.known.clear()
