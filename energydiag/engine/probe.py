"""A checkpoint's model, and the run's loss, on one batch: the one place that builds them.

Replay needs a whole session (optimizer, scaler, step function: ``session.open_session``);
everything that only looks (judging a checkpoint by its loss, inspecting a batch, refining
actions, measuring input offsets) needs the model with a checkpoint's weights and, sometimes, the
loss. A failure while building either is blamed on the file that configured it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from energydiag.engine.plugins import LossFn, LossOutput, build_loss, build_model
from energydiag.engine.session import load_checkpoint
from energydiag.engine.step import autocast
from energydiag.errors import blame
from energydiag.io.manifest import LossSpec, ModelSpec
from energydiag.io.rundir import Batch, Checkpoint
from energydiag.io.state import restore_rng


class Probe:
    """Built once; ``load`` puts a checkpoint's weights in, as often as there are checkpoints."""

    def __init__(
        self,
        spec: ModelSpec,
        device: torch.device,
        blamed: str | Path,
        loss: LossSpec | None = None,
        autocast_dtype: str | None = None,
        **loss_overrides: Any,
    ) -> None:
        self.device, self.autocast_dtype = device, autocast_dtype
        with blame(blamed):
            self.model: nn.Module = build_model(spec).to(device)
            self.loss_fn: LossFn | None = build_loss(loss, **loss_overrides) if loss else None

    def load(self, checkpoint: Checkpoint) -> nn.Module:
        load_checkpoint(checkpoint, self.model, None)
        return self.model

    def loss(self, batch: Batch) -> LossOutput:
        """The loss on ``batch`` as its step computed it (its RNG state, the run's autocast),
        without gradients. The caller handles what the user's loss raises."""
        restore_rng(batch.rng)
        with torch.no_grad(), autocast(self.device, self.autocast_dtype):
            return self.loss_fn(self.model, batch.on(self.device))
