"""How a tensor becomes the few float64 numbers a fingerprint keeps, on its own device.

A float64 reduction of float32 data on the CPU first casts a whole copy of the tensor, once per
reduction; ``reduce64`` casts a chunk at a time into one reused buffer instead. Most of the
tensors a step makes are small (a bias, a norm, a scalar), where the cost of a reduction is the
call, not the data: ``Reductions`` widens each of them into a row of a zero-padded block and
reduces the block row by row once it is full. Zeros add nothing to a sum or a sum of squares,
and a row is reduced alone in any thread count, so the values do not depend on the threads.
"""

from __future__ import annotations

import functools

import torch

CHUNK = 1 << 16  # elements widened at once on the CPU (512 KiB as float64 or int64)
ROW = 1 << 10  # tensors up to this many elements are reduced in rows of a block
ROWS = 32  # rows to a block: 256 KiB of float64
# Stored with numerics baselines: 1 reduced whole tensors, 2 by CHUNK, 3 also small ones in rows
METHOD = 3


class Reductions:
    """A step's fingerprints as they are taken, each a slot, read back at once (no sync per op):
    a float64 L2 norm and sum per slot, and with ``bitwise`` a checksum of its bits."""

    def __init__(self, bitwise: bool = False) -> None:
        self.bitwise = bitwise
        self.norms: list[torch.Tensor] = []  # 0-d float64, per tensor over ROW elements
        self.sums: list[torch.Tensor] = []
        self.blocks: dict[torch.device, _Block] = {}
        self.where: list[tuple[torch.device | None, int]] = []  # per slot: block (or None), index
        self.numels: list[int] = []  # per slot
        self.checksums: list[torch.Tensor] = []  # per slot, 0-d int64 (bitwise only)
        self.scratch = torch.empty(CHUNK, dtype=torch.float64)  # reduce64's, on the CPU

    def add(self, t: torch.Tensor) -> int:
        """Reduce ``t`` as it is now; its slot."""
        scratch = self.scratch if t.device.type == "cpu" else None
        if t.numel() <= ROW:
            if t.device not in self.blocks:
                self.blocks[t.device] = _Block(t.device)
            self.where.append((t.device, self.blocks[t.device].add(t)))
        else:
            norm, total = reduce64(t, scratch)
            self.where.append((None, len(self.norms)))
            self.norms.append(norm)
            self.sums.append(total)
        self.numels.append(t.numel())
        if self.bitwise:
            self.checksums.append(checksum(t, scratch))
        return len(self.where) - 1

    def read(self) -> tuple[list[list[float]], list[int]]:
        """Per slot: [norm, sum], and its checksum (an empty list unless ``bitwise``)."""
        tables: dict[torch.device | None, list[list[float]]] = {
            device: block.table().tolist() for device, block in self.blocks.items()
        }
        if self.norms:
            tables[None] = torch.stack([_stacked(self.norms), _stacked(self.sums)], 1).tolist()
        bits = _stacked(self.checksums).tolist() if self.checksums else []
        return [tables[device][i] for device, i in self.where], bits


class _Block:
    """Small tensors widened to float64 into the rows of a zero-padded block, reduced a block at
    a time: one norm and one sum per ROWS tensors instead of a cast, a norm and a sum each."""

    def __init__(self, device: torch.device) -> None:
        self.rows = torch.zeros(ROWS, ROW, dtype=torch.float64, device=device)
        self.filled = 0
        self.done: list[torch.Tensor] = []  # [ROWS, 2] per full block

    def add(self, t: torch.Tensor) -> int:
        if self.filled == ROWS:
            self.done.append(_by_row(self.rows))
            self.rows.zero_()
            self.filled = 0
        self.rows[self.filled, : t.numel()].copy_(t.detach().reshape(-1))
        self.filled += 1
        return len(self.done) * ROWS + self.filled - 1

    def table(self) -> torch.Tensor:
        """[n, 2]: every row added so far, the last block's too."""
        return torch.cat([*self.done, _by_row(self.rows[: self.filled])])


def _by_row(rows: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.linalg.vector_norm(rows, dim=1), rows.sum(1)], 1)


def _stacked(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.to(values[0].device) for v in values])


def reduce64(
    t: torch.Tensor, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 L2 norm and sum of a tensor's elements, cast to float64 a chunk at a time
    into ``scratch`` (CHUNK float64 elements, reused: a fresh copy each time is fresh pages to
    fault in), so the extra memory is one chunk, not copies of the largest tensor."""
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
