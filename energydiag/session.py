"""A model, optimizer and loss built from a run's manifest and loaded from one checkpoint."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from energydiag.errors import DiagError
from energydiag.plugins import LossFn, build_loss, build_model, build_optimizer
from energydiag.run import Batch, Checkpoint, Run
from energydiag.state import optimizer_state_dict, restore_rng
from energydiag.step import StepResult, train_step


@dataclass
class Session:
    run: Run
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    device: torch.device
    step: int
    grad_clip: float | None = None
    autocast_dtype: str | None = None

    def batch_on_device(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.tensors.items()}

    def train(
        self,
        batch: Batch,
        observe: AbstractContextManager | None = None,
        update: bool | None = None,
    ) -> StepResult:
        """The run's training step on ``batch``, from the RNG state the batch was recorded with.

        Updates follow the manifest's warm-up (optimizer.start_step) unless ``update`` says otherwise.
        """
        if update is None:
            update = batch.step >= self.run.manifest.optimizer.start_step
        restore_rng(batch.rng)
        return train_step(
            self.model,
            self.optimizer,
            self.loss_fn,
            self.batch_on_device(batch),
            grad_clip=self.grad_clip,
            autocast_dtype=self.autocast_dtype,
            observe=observe,
            update=update,
        )


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiagError(None, f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def open_session(run: Run, step: int, device: torch.device, **loss_overrides: object) -> Session:
    """Build everything from the manifest and load the checkpoint at or before ``step``."""
    start = run.checkpoint_at_or_before(step)
    model = build_model(run.manifest.model).to(device)
    optimizer = build_optimizer(run.manifest.optimizer, model)
    load_checkpoint(run.checkpoint(start), model, optimizer)
    loss_fn = build_loss(run.manifest.loss, **loss_overrides)
    manifest = run.manifest
    return Session(
        run, model, optimizer, loss_fn, device, start, manifest.grad_clip, manifest.autocast_dtype
    )


def load_checkpoint(
    ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ckpt.model))
    unexpected = sorted(set(ckpt.model) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        n = len(missing) + len(unexpected)
        raise DiagError(ckpt.path, f"does not match the model: {what} ({n} key(s) differ)")
    for key, value in ckpt.model.items():
        if value.shape != expected[key].shape:
            raise DiagError(
                ckpt.path,
                f"shape mismatch for {key!r}: file {list(value.shape)}, model {list(expected[key].shape)}",
            )
    model.load_state_dict(ckpt.model)
    if optimizer is None or not ckpt.optim:
        return
    try:
        optimizer.load_state_dict(optimizer_state_dict(ckpt.optim, ckpt.meta, model, optimizer))
    except (KeyError, ValueError) as err:
        raise DiagError(ckpt.path, f"optimizer state does not match the model ({err})") from None
