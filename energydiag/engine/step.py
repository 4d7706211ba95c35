"""The training-step contract that replay executes: ``step(model, optimizer, batch, ctx) -> loss``.

The built-in ``default_step`` is zero_grad -> forward (under autocast) -> backward -> clip ->
optimizer.step, the sequence the Recorder documents (with a GradScaler: scale, backward,
unscale_, clip, scaler.step, scaler.update). A run whose loop does more (two losses,
gradient accumulation, a GradScaler, skip-if-non-finite) names its own function in run.json
(``"step": "pkg.mod:train_step"``) and replay calls it, cheap tier and deep tier alike. The
function uses ``ctx.forward`` for each (micro-)batch and ``ctx.clip`` for clipping, so replay can
attribute a fault to the micro-batch and knows the gradient norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from energydiag.engine.instrument import PhaseClock
from energydiag.engine.plugins import LossFn
from energydiag.engine.tensorstats import global_norm, plain

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepContext:
    """What a step function may use: the run's loss, clipping, precision and step number."""

    step: int
    loss_fn: LossFn
    device: torch.device
    grad_clip: float | None = None
    autocast_dtype: str | None = None
    update: bool = True  # False during a warm-up: compute and backpropagate, do not step
    clock: PhaseClock = field(default_factory=PhaseClock)
    grad_norm: torch.Tensor | None = None
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    observe: Callable[[], contextlib.AbstractContextManager] | None = None
    scaler: torch.amp.GradScaler | None = None

    def forward(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The run's loss on one (micro-)batch, under the run's autocast."""
        observing = self.observe() if self.observe else contextlib.nullcontext()
        with observing, autocast(self.device, self.autocast_dtype):
            loss, diagnostics = self.loss_fn(model, dict(batch))
        self.diagnostics = diagnostics
        return loss, diagnostics

    def clip(self, model: nn.Module) -> torch.Tensor:
        """Clip when the run clips; either way remember and return the global gradient norm."""
        self.grad_norm = clip(model, self.grad_clip)
        return self.grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the run's GradScaler when it has one."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def finish(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The rest of the step after the last backward: unscale (with a GradScaler), clip,
        then step and update the scale unless this is a warm-up step."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        self.clip(model)
        if not self.update:
            return
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


StepFn = Callable[[nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor], StepContext], Any]


@dataclass
class StepResult:
    loss: torch.Tensor
    grad_norm: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


def default_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    ctx: StepContext,
) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss, _ = ctx.forward(model, batch)
    ctx.backward(loss)
    ctx.finish(model, optimizer)
    return loss


def run_step_fn(
    fn: StepFn,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    ctx: StepContext,
) -> StepResult:
    """Call a step function and collect its loss and gradient norm as 0-d tensors."""
    loss = fn(model, optimizer, batch, ctx)
    loss = loss if isinstance(loss, torch.Tensor) else torch.as_tensor(float(loss))
    norm = ctx.grad_norm
    if norm is None:  # the function did not call ctx.clip: measure what it left behind
        norm = global_norm([p.grad for p in model.parameters() if p.grad is not None])
    return StepResult(plain(loss.detach()), plain(norm.detach()), ctx.diagnostics)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: str | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[dtype]):
        yield


def clip(model: nn.Module, grad_clip: float | None) -> torch.Tensor:
    """Clip when configured; either way return the global gradient norm as a 0-d tensor."""
    grads = [p for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if grad_clip is None:
        return global_norm([p.grad for p in grads])
    return plain(torch.nn.utils.clip_grad_norm_(grads, grad_clip))
