"""Recorded ranks played in turn by fewer processes, down to one.

A DDP step (an FSDP one, reduce-scattered) averages the ranks' gradients: each rank's
backward, then the mean over ranks. A process that holds the model once can do the same with
the ranks' logged batches in turn:
zero the gradients, then for each rank restore its RNG, run its forward and backward of
loss / k, and step once. Over W' processes each plays k = W / W' ranks and DDP's all-reduce
averages the W' partial means (its own sync skipped until the last of the k). The sum runs in
rank order, not in DDP's bucket order: a difference of float rounding, which replay's fidelity
names and measures against the recorded checkpoints.

The same machinery swaps a run's in-batch negatives for gathered ones: ``together`` joins the
ranks' batches into one, so each positive meets every rank's actions and the gradient is that
of the whole batch (what a gather that carries gradients computes).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from energydiag.engine.ranks import is_sharded
from energydiag.engine.step import StepContext
from energydiag.io.rundir import Batch, Run
from energydiag.io.state import restore_rng


@dataclass
class RanksInTurn:
    """A step function (``step(model, optimizer, batch, ctx)``) that plays ``runs`` — recorded
    ranks — on one model; ``batch`` (the first rank's, already prepared) is not used again."""

    runs: list[Run]
    to_device: Callable[[Batch], dict[str, torch.Tensor]]
    together: bool = False

    def __call__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: dict[str, torch.Tensor],
        ctx: StepContext,
    ) -> torch.Tensor:
        parts = [run.batch(ctx.step) for run in self.runs]
        parts = [joined(parts)] if self.together else parts
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for i, part in enumerate(parts):
            restore_rng(part.rng)
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last else _no_sync(model):
                loss, _ = ctx.forward(model, self.to_device(part))
                (loss / len(parts)).backward()
            losses.append(loss.detach())
        ctx.clip(model)
        if ctx.update:
            optimizer.step()
        return _first_loss(losses)

    def rank_of(self, micro_batch: int | None) -> int | None:
        """The recorded rank whose forward and backward were the ``micro_batch``-th (1-based)."""
        if self.together or micro_batch is None or not 1 <= micro_batch <= len(self.runs):
            return None
        return self.runs[micro_batch - 1].rank


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's gradient sync (FSDP's reduce-scatter) waits for the last of this process's ranks."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if is_sharded(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _first_loss(losses: list[torch.Tensor]) -> torch.Tensor:
    """The first rank's loss (the one its log holds), unless another rank's is non-finite."""
    bad = [v for v in losses if not math.isfinite(float(v))]
    return bad[0] if bad else losses[0]


def joined(parts: list[Batch]) -> Batch:
    """The batches as one: every per-sample tensor (first dim = the first batch's size)
    concatenated, other tensors from the first; the first batch's step, RNG and metadata."""
    first = parts[0]
    sizes = [t.shape[0] for t in first.tensors.values() if t.dim()]
    size = first.size if "h" in first.tensors else max(set(sizes), key=sizes.count)
    merged = {
        key: torch.cat([p.tensors[key] for p in parts]) if t.dim() and t.shape[0] == size else t
        for key, t in first.tensors.items()
    }
    return Batch(first.step, first.path, merged, first.rng, first.meta)


def played_ranks(run: Run, here: int, rank: int) -> list[Run]:
    """The recorded ranks process ``rank`` of ``here`` plays: a contiguous block of W / here."""
    per = run.manifest.world_size // here
    return [run.of_rank(r) for r in range(rank * per, (rank + 1) * per)]
