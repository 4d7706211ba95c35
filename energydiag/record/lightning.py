"""Record a Lightning 2.x run from the trainer's own hooks.

    from energydiag.record.lightning import EnergydiagCallback
    trainer = L.Trainer(callbacks=[EnergydiagCallback()], gradient_clip_val=1.0)

The run directory defaults to the trainer's own: ``trainer.log_dir`` (the first logger's
version folder, else ``default_root_dir``) + ``/energydiag``.

Hooks used, in Lightning's order within one step: ``on_train_batch_start`` (RNG state and batch,
a checkpoint every N steps; with gradient accumulation, each later micro-batch joins the step),
``on_before_backward`` (the loss, already divided by ``accumulate_grad_batches``; under
``16-mixed``, multiplied by the GradScaler's scale too, which is divided out again),
``on_before_optimizer_step`` (after the last backward, before clipping and the update: the
gradient norm, and a dump of the pre-step state when something is non-finite) and
``on_exception``. Replay rebuilds the LightningModule from its class and ``hparams`` and calls
its ``training_step`` through :func:`training_step` (a module without ``forward`` is the norm;
a DDP replay routes the step through DDP's forward, as Lightning does, so it all-reduces).
An alarm is also logged to the trainer's loggers as ``energydiag/alarm/<rule>`` = 1.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from energydiag.errors import DiagError, first_line
from energydiag.record.accumulation import DIVISOR, STEP, micro_batch
from energydiag.record.batches import (
    from_mapping,
    gradient_norm,
    import_target,
    to_mapping,
)
from energydiag.record.recorder import Recorder

BATCH_INDEX = "lightning.batch_idx"
NAME = "energydiag"  # the run directory's name under the trainer's log_dir
AUTOCAST = {"32-true": None, "32": None, "bf16-mixed": "bfloat16", "16-mixed": "float16"}


class EnergydiagCallback(pl.Callback):
    """A flight recorder for ``L.Trainer``; keyword options are the Recorder's
    (``checkpoint_every``, ``keep_batches``, ``persist_batches``, ``overwrite``, ``seed``...).

    ``model_spec`` defaults to the LightningModule's class with its saved ``hparams``.
    Supported: one process or DDP (each rank records its own batches, rank 0 the checkpoints, as
    the Recorder does under torchrun), one optimizer, automatic optimization, norm clipping,
    gradient accumulation, 32-bit, bf16-mixed or 16-mixed precision (with its GradScaler, whose
    state is recorded per step); anything else is refused when fitting starts.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        *,
        model_spec: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.model_spec, self.options = model_spec, options
        self.recorder: Recorder | None = None
        self._loss: torch.Tensor | None = None
        self._micro = -1  # the micro-batch of the open step; -1: no step open

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_supported(trainer, pl_module)
        clip = trainer.gradient_clip_val
        spec = self.model_spec or {
            "target": import_target(pl_module),
            "kwargs": dict(pl_module.hparams),
        }
        self.run_dir = self.run_dir or Path(trainer.log_dir or trainer.default_root_dir) / NAME
        accumulates = trainer.accumulate_grad_batches > 1
        self.recorder = Recorder(
            self.run_dir,
            model=trainer.strategy.model,  # DDP around the module, under several processes
            optimizer=trainer.optimizers[0],
            model_spec=spec,
            loss={"target": "energydiag.record.lightning:training_step"},
            grad_clip=float(clip) if clip else None,
            autocast_dtype=AUTOCAST[str(trainer.precision)],
            scaler=_scaler(trainer),
            **({"step": STEP} if accumulates else {}),
            **self.options,
        )
        self.recorder.alarms.listeners.append(functools.partial(_log_alarms, trainer))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        record = to_mapping(batch) | {BATCH_INDEX: torch.tensor(batch_idx)}
        self._micro += 1
        if trainer.accumulate_grad_batches == 1:
            self._live.start_step(trainer.global_step, record)
        elif self._micro == 0:  # Lightning divides every micro-batch's loss by K, even a last few
            divisor = {DIVISOR: torch.tensor(float(trainer.accumulate_grad_batches))}
            self._live.start_step(trainer.global_step, micro_batch(0, record) | divisor)
        else:
            self._live.add_to_step(micro_batch(self._micro, record))

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        scaler = _scaler(trainer)
        loss = loss.detach() / scaler.get_scale() if scaler else loss.detach()  # a power of 2
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss, self._loss, self._micro = self._loss, None, -1
        if loss is not None:
            self._live.end_step(loss, grad_norm=gradient_norm(pl_module))

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


def _scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """16-mixed's GradScaler (Lightning makes one; on the CPU only through an explicit
    ``MixedPrecision("16-mixed", "cpu")`` plugin: ``precision="16-mixed"`` becomes bf16)."""
    return getattr(trainer.precision_plugin, "scaler", None)


def _log_alarms(trainer: pl.Trainer, alarms: list) -> None:
    """Each alarm as a metric in every logger the trainer has (TensorBoard, CSV, W&B...)."""
    metrics = {f"energydiag/alarm/{alarm.rule}": 1.0 for alarm in alarms}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def _check_supported(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    refusals = {
        "manual optimization": not pl_module.automatic_optimization,
        f"{len(trainer.optimizers)} optimizers": len(trainer.optimizers) != 1,
        f"gradient_clip_algorithm={_named(trainer.gradient_clip_algorithm)!r}": (
            bool(trainer.gradient_clip_val)
            and trainer.gradient_clip_algorithm not in (None, "norm")
        ),
        f"precision={trainer.precision!r}": str(trainer.precision) not in AUTOCAST,
        # DDP is recorded as DDP; another strategy's wrapping (FSDP, DeepSpeed) is not
        f"{trainer.world_size} processes under {type(trainer.strategy).__name__}": (
            trainer.world_size != 1 and not isinstance(trainer.strategy.model, DDP)
        ),
    }
    refused = [what for what, bad in refusals.items() if bad]
    if refused:
        raise DiagError(None, f"EnergydiagCallback cannot record a run with {', '.join(refused)}")


def _named(choice: Any) -> Any:
    """An enum member as the string a user passes to the Trainer."""
    return getattr(choice, "value", choice)


def training_step(model: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss replay uses: the module's own ``training_step`` on the recorded batch."""
    tensors = dict(batch)
    index = int(tensors.pop(BATCH_INDEX, torch.tensor(0)))
    with warnings.catch_warnings():  # self.log() without a trainer warns once per call
        warnings.simplefilter("ignore")
        out = _through_wrapper(model, from_mapping(tensors), index)
    return out["loss"] if isinstance(out, Mapping) else out


def _through_wrapper(model: torch.nn.Module, batch: Any, index: int) -> Any:
    """``training_step`` called through DDP's forward, where its reducer learns that a step
    began (called around it, backward would not all-reduce): as Lightning does, the step
    stands in for the module's ``forward`` for that one call."""
    if not isinstance(model, DDP):
        return model.training_step(batch, index)
    module = model.module

    def step_once(*args: Any) -> Any:
        module.__dict__.pop("forward")  # the step may call the module's real forward
        return module.training_step(*args)

    module.forward = step_once
    try:
        return model(batch, index)
    finally:
        module.__dict__.pop("forward", None)
