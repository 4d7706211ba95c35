"""One training step, split into the phases replay needs to tell apart.

``train_step`` is the exact sequence the Recorder documents and replay re-executes:
zero_grad -> forward (under autocast) -> backward -> clip -> optimizer.step. A user loop that
runs the same calls in the same order replays bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from energydiag.plugins import LossFn

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepResult:
    loss: torch.Tensor
    grad_norm: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: str | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[dtype]):
        yield


def forward(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Mapping[str, torch.Tensor],
    device: torch.device,
    autocast_dtype: str | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with autocast(device, autocast_dtype):
        return loss_fn(model, dict(batch))


def clip(model: nn.Module, grad_clip: float | None) -> torch.Tensor:
    """Clip when configured; either way return the global gradient norm as a 0-d tensor."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if grad_clip is None:
        return torch.nn.utils.get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.grad is not None], grad_clip
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    batch: Mapping[str, torch.Tensor],
    *,
    grad_clip: float | None,
    autocast_dtype: str | None = None,
    observe: contextlib.AbstractContextManager | None = None,
    update: bool = True,
) -> StepResult:
    """One step. ``observe`` (e.g. a probe) wraps the forward pass only; ``update=False`` skips
    the optimizer step, as a warm-up that trains nothing yet does."""
    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    with observe or contextlib.nullcontext():
        loss, diagnostics = forward(model, loss_fn, batch, device, autocast_dtype)
    loss.backward()
    grad_norm = clip(model, grad_clip)
    if update:
        optimizer.step()
    return StepResult(loss.detach(), grad_norm.detach(), diagnostics)
