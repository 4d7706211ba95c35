"""A small synthetic context→action task and a recorded training loop over it.

Fixtures, benchmarks and the demo record their runs through ``record_run``, a plain training
loop whose only energydiag calls are the Recorder's: the reference for how a user loop calls it.
"""

from __future__ import annotations

import functools
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from energydiag.record.recorder import Recorder
from energydiag.reference import losses
from energydiag.reference.models import EnergyModel

Fault = Callable[[int, dict[str, torch.Tensor]], None]


@dataclass(frozen=True)
class Task:
    """Shapes of the task: contexts h [B,S,D], action chunks a [B,H,Da]."""

    batch: int = 8
    seq: int = 6
    d_context: int = 16
    horizon: int = 4
    d_action: int = 3

    def model_shapes(self) -> dict[str, int]:
        """The EnergyModel arguments that must match this task's tensors."""
        return {"d_context": self.d_context, "d_action": self.d_action, "horizon": self.horizon}


def batches(task: Task, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches in which the expert action is a fixed function of the unmasked context.

    Uses its own generator so the global RNG (dropout) is untouched by data loading.
    """
    gen = torch.Generator().manual_seed(seed)
    proj = (
        torch.randn(task.d_context, task.horizon * task.d_action, generator=gen)
        / task.d_context**0.5
    )
    while True:
        h = torch.randn(task.batch, task.seq, task.d_context, generator=gen)
        pad = torch.randint(0, task.seq - 1, (task.batch,), generator=gen)
        mask = torch.arange(task.seq)[None, :] >= (task.seq - pad)[:, None]
        keep = (~mask).unsqueeze(-1).float()
        pooled = (h * keep).sum(1) / keep.sum(1)
        a = torch.tanh(2.0 * pooled @ proj).view(task.batch, task.horizon, task.d_action)
        a = a + 0.05 * torch.randn(a.shape, generator=gen)
        yield {"h": h, "a_pos": a, "pad_mask": mask}


def record_run(
    run_dir: str | Path,
    *,
    task: Task = Task(),
    model_kwargs: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    lr: float = 3e-3,
    grad_clip: float | None = 1.0,
    steps: int = 100,
    checkpoint_every: int = 20,
    keep_batches: int = 16,
    persist_batches: bool = True,
    seed: int = 0,
    fault: Fault | None = None,
    optimizer_start_step: int = 0,
    skip_nonfinite_updates: bool = False,
    overwrite: bool = False,
    progress: Callable[[], None] | None = None,
) -> Recorder:
    """Train the reference model on the synthetic task, recording everything; ``progress()``
    after every step. ``optimizer_start_step``: a warm-up that computes the loss but does not
    update before it. ``skip_nonfinite_updates``: a loop that skips the update when the step
    is non-finite, so the run can recover from a bad batch. The loop is plain PyTorch: the
    Recorder is its only energydiag call."""
    torch.manual_seed(seed)
    kwargs = task.model_shapes() | (model_kwargs or {})
    model = EnergyModel(**kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = loss or {"name": "inbatch_infonce", "kwargs": {"tau": 1.0}}
    fn = getattr(losses, loss["name"]) if "name" in loss else pkgutil.resolve_name(loss["target"])
    loss_fn = functools.partial(fn, **loss.get("kwargs", {}))
    data = batches(task, seed + 1)
    with Recorder(
        run_dir,
        model=model,
        optimizer=optimizer,
        model_spec={"target": "energydiag.reference.models:EnergyModel", "kwargs": kwargs},
        loss=loss,
        grad_clip=grad_clip,
        seed=seed,
        optimizer_start_step=optimizer_start_step,
        checkpoint_every=checkpoint_every,
        keep_batches=keep_batches,
        persist_batches=persist_batches,
        overwrite=overwrite,
    ) as rec:
        for step in range(steps):
            batch = next(data)
            if fault is not None:
                fault(step, batch)
            rec.start_step(step, batch)
            value, grad_norm, scalars = _backward(model, optimizer, loss_fn, batch, grad_clip)
            healthy = rec.end_step(value, grad_norm=grad_norm, **scalars)
            if step >= optimizer_start_step and (healthy or not skip_nonfinite_updates):
                optimizer.step()
            if progress:
                progress()
        rec.save_checkpoint(steps)
    return rec


def _backward(model, optimizer, loss_fn, batch, grad_clip):
    """zero_grad, loss, backward, clip: plain PyTorch, as a user's loop writes it."""
    optimizer.zero_grad(set_to_none=True)
    out = loss_fn(model, batch)
    value, diagnostics = out if isinstance(out, tuple) else (out, {})
    value.backward()
    grads = [p for p in model.parameters() if p.grad is not None]
    if grad_clip is None:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(grads, grad_clip)
    return value, grad_norm, {k: v for k, v in diagnostics.items() if v.dim() == 0}
