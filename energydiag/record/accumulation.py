"""Gradient accumulation as the trainers run it: K micro-batches, one optimizer step.

A step's recorded batch holds every micro-batch under ``micro.<i>.`` and the divisor the trainer
scaled each micro-batch's loss by (Lightning: ``accumulate_grad_batches``, even for a short last
window; the HF Trainer: the micro-batches in this window). ``accumulated_step`` is the step
function such runs name in their manifest: each micro-batch's forward and backward of
loss / divisor, in order, then one clip and one optimizer step, as the trainer did; with a
GradScaler, each micro-batch's backward is scaled and the gradients unscaled once before the
clip, as Lightning's 16-mixed does.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from energydiag.engine.step import StepContext

MICRO = "micro."
DIVISOR = "energydiag.divisor"
STEP = "energydiag.record.accumulation:accumulated_step"


def micro_batch(index: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One micro-batch's tensors under its prefix in the step's batch."""
    return {f"{MICRO}{index}.{key}": value for key, value in tensors.items()}


def micro_batches(batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in batch.items():
        if key.startswith(MICRO):
            index, name = key[len(MICRO) :].split(".", 1)
            parts.setdefault(int(index), {})[name] = value
    return [parts[i] for i in sorted(parts)]


def accumulated_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    ctx: StepContext,
) -> torch.Tensor:
    """The trainers' accumulation: the loss returned is the mean the trainer reported."""
    parts, divisor = micro_batches(batch), float(batch[DIVISOR])
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for part in parts:
        loss, _ = ctx.forward(model, part)
        scaled = loss / divisor
        ctx.backward(scaled)
        total = total.to(loss.device) + scaled.detach()
    ctx.finish(model, optimizer)
    return total
