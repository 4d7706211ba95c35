"""Record a Lightning 2.x run from the trainer's own hooks.

    from energydiag.record.lightning import EnergydiagCallback
    trainer = L.Trainer(callbacks=[EnergydiagCallback("runs/exp1")], gradient_clip_val=1.0)

Hooks used, in Lightning's order within one step: ``on_train_batch_start`` (RNG state and batch,
a checkpoint every N steps), ``on_before_backward`` (the loss), ``on_before_optimizer_step``
(after backward, before clipping and the update: the gradient norm, and a dump of the pre-step
state when something is non-finite) and ``on_exception``. Replay rebuilds the LightningModule
from its class and ``hparams`` and calls its ``training_step`` through :func:`training_step`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from energydiag.errors import DiagError, first_line
from energydiag.record.batches import (
    from_mapping,
    gradient_norm,
    import_target,
    to_mapping,
)
from energydiag.record.recorder import Recorder

BATCH_INDEX = "lightning.batch_idx"
AUTOCAST = {"32-true": None, "32": None, "bf16-mixed": "bfloat16"}


class EnergydiagCallback(pl.Callback):
    """A flight recorder for ``L.Trainer``; keyword options are the Recorder's
    (``checkpoint_every``, ``keep_batches``, ``persist_batches``, ``overwrite``, ``seed``...).

    ``model_spec`` defaults to the LightningModule's class with its saved ``hparams``.
    Supported: one optimizer, automatic optimization, norm clipping, 32-bit or bf16-mixed
    precision, no gradient accumulation; anything else is refused when fitting starts.
    """

    def __init__(
        self, run_dir: str | Path, *, model_spec: Mapping[str, Any] | None = None, **options: Any
    ) -> None:
        self.run_dir, self.model_spec, self.options = Path(run_dir), model_spec, options
        self.recorder: Recorder | None = None
        self._loss: torch.Tensor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_supported(trainer, pl_module)
        clip = trainer.gradient_clip_val
        spec = self.model_spec or {
            "target": import_target(pl_module),
            "kwargs": dict(pl_module.hparams),
        }
        self.recorder = Recorder(
            self.run_dir,
            model=pl_module,
            optimizer=trainer.optimizers[0],
            model_spec=spec,
            loss={"target": "energydiag.record.lightning:training_step"},
            grad_clip=float(clip) if clip else None,
            autocast_dtype=AUTOCAST[str(trainer.precision)],
            **self.options,
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        record = to_mapping(batch) | {BATCH_INDEX: torch.tensor(batch_idx)}
        self._loss = None
        self._live.start_step(trainer.global_step, record)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._loss is not None:
            self._live.end_step(self._loss, grad_norm=gradient_norm(pl_module))

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.recorder is not None and isinstance(exception, Exception):
            self.recorder.dump("exception", exception=first_line(exception))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.recorder is not None:
            self.recorder.close()

    @property
    def _live(self) -> Recorder:
        if self.recorder is None:
            raise RuntimeError("EnergydiagCallback: training began before on_fit_start")
        return self.recorder


def _check_supported(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    refusals = {
        "manual optimization": not pl_module.automatic_optimization,
        f"{len(trainer.optimizers)} optimizers": len(trainer.optimizers) != 1,
        f"accumulate_grad_batches={trainer.accumulate_grad_batches}": (
            trainer.accumulate_grad_batches != 1
        ),
        f"gradient_clip_algorithm={trainer.gradient_clip_algorithm!r}": (
            bool(trainer.gradient_clip_val)
            and trainer.gradient_clip_algorithm not in (None, "norm")
        ),
        f"precision={trainer.precision!r}": str(trainer.precision) not in AUTOCAST,
    }
    refused = [what for what, bad in refusals.items() if bad]
    if refused:
        raise DiagError(None, f"EnergydiagCallback cannot record a run with {', '.join(refused)}")


def training_step(model: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss replay uses: the module's own ``training_step`` on the recorded batch."""
    tensors = dict(batch)
    index = int(tensors.pop(BATCH_INDEX, torch.tensor(0)))
    with warnings.catch_warnings():  # self.log() without a trainer warns once per call
        warnings.simplefilter("ignore")
        out = model.training_step(from_mapping(tensors), index)
    return out["loss"] if isinstance(out, Mapping) else out
