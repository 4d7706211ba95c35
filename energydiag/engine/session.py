"""A model, optimizer, loss and step function built from a run's manifest and one checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

from energydiag.engine.instrument import PhaseClock
from energydiag.engine.plugins import (
    LossFn,
    build_loss,
    build_model,
    build_optimizer,
    loss_gathers,
    resolve,
)
from energydiag.engine.ranks import check_world, for_replay, rank_and_world
from energydiag.engine.simulated import RanksInTurn, played_ranks
from energydiag.engine.step import StepContext, StepFn, StepResult, default_step, run_step_fn
from energydiag.errors import DiagError, OptionError, blame
from energydiag.io.rundir import Batch, Checkpoint, Run, parse_groups
from energydiag.io.state import (
    apply_hyperparameters,
    hyperparameters,
    optimizer_state_dict,
    restore_rng,
)

Groups = list[dict[str, object]]
HyperparameterRule = Callable[[Groups], Groups]


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
    step_fn: StepFn = default_step
    optimizer_state: bool = True  # False when the checkpoint held none (a converted run)
    scaler: torch.amp.GradScaler | None = None
    compute_dtype: torch.dtype | None = None  # float inputs cast to this (the precision ladder)
    loss_kwargs: dict[str, object] = field(default_factory=dict)  # as bound, overrides included
    # A what-if's change to the schedule: recorded groups -> groups to apply. Applied
    # after the recording, so a variant's lr is not overwritten by the recorded one.
    adjust_hyperparameters: HyperparameterRule | None = None
    base_hyperparameters: Groups = field(default_factory=list)
    # A what-if's change to the inputs (e.g. an input path re-centred), applied on the device.
    transform_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def batch_on_device(self, batch: Batch) -> dict[str, torch.Tensor]:
        return batch.on(self.device, self.compute_dtype)

    def set_precision(self, dtype: torch.dtype) -> None:
        """Run everything the session controls in ``dtype``: parameters, optimizer state, float
        inputs; no autocast and no loss scaling. Casts inside the user's own code still apply."""
        self.model.to(dtype)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim():
                    state[key] = value.to(dtype)
        self.autocast_dtype, self.scaler, self.compute_dtype = None, None, dtype

    def context(
        self,
        batch: Batch,
        update: bool | None = None,
        clock: PhaseClock | None = None,
        observe: Callable[[], AbstractContextManager] | None = None,
    ) -> StepContext:
        """The step context for ``batch``: warm-up and skipped steps from the run unless
        ``update`` says."""
        if update is None:  # a warm-up step, or one the run skipped on an alarm, does not update
            started = batch.step >= self.run.manifest.optimizer.start_step
            update = started and batch.step not in self.run.skipped_steps
        return StepContext(
            batch.step,
            self.loss_fn,
            self.device,
            self.grad_clip,
            self.autocast_dtype,
            update,
            clock or PhaseClock(),
            observe=observe,
            scaler=self.scaler,
        )

    def prepare(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Put the optimizer's recorded hyperparameters and the step's RNG state in place."""
        recorded = batch.hyperparameters
        if self.adjust_hyperparameters is not None:
            recorded = self.adjust_hyperparameters(recorded or self.base_hyperparameters)
        if recorded is not None:
            try:
                apply_hyperparameters(self.optimizer, recorded)
            except (ValueError, TypeError) as err:
                raise DiagError(batch.path, f"recorded hyperparameters do not fit: {err}") from None
        restore_rng(batch.rng)
        state = batch.scaler_state
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)
        return self.inputs(batch)

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The batch as the model gets it: on the device, with a what-if's change applied."""
        data = self.batch_on_device(batch)
        return self.transform_batch(data) if self.transform_batch else data

    def play_ranks(self, runs: list[Run], together: bool = False) -> None:
        """Play these recorded ranks in turn each step (their gradients averaged, or with
        ``together`` their batches joined into one), with the built-in step only."""
        manifest = self.run.manifest
        where = self.run.manifest_path
        if manifest.step:
            raise DiagError(
                where,
                f"plays its ranks through its own step {manifest.step!r}: "
                f"replay it on its {manifest.world_size} recorded ranks",
            )
        if self.scaler is not None:
            raise DiagError(where, "used a GradScaler: replay it on its recorded ranks")
        if loss_gathers(self.loss_fn):
            raise DiagError(where, "its loss gathers across ranks: replay it on its recorded ranks")
        self.step_fn = RanksInTurn(runs, self.inputs, together)

    def train(
        self,
        batch: Batch,
        observe: Callable[[], AbstractContextManager] | None = None,
        update: bool | None = None,
    ) -> StepResult:
        """The run's own training step on ``batch``, exactly as it was recorded."""
        data = self.prepare(batch)
        ctx = self.context(batch, update, observe=observe)
        return run_step_fn(self.step_fn, self.model, self.optimizer, data, ctx)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name == "cpu" or name == "cuda" or name.startswith("cuda:")):
        raise OptionError("use cpu, cuda, cuda:N or auto", "device", value=repr(name))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("CUDA is not available on this machine", "device", value=name)
    return torch.device(name)


def open_session(run: Run, step: int, device: torch.device, **loss_overrides: object) -> Session:
    """Build everything from the manifest and load the checkpoint at or before ``step``."""
    start = run.checkpoint_at_or_before(step)
    manifest = run.manifest
    check_world(manifest.distributed)
    ckpt = run.checkpoint(start)
    with blame(run.manifest_path):
        model = build_model(manifest.model).to(device)
        if manifest.parallelize:  # shard first: the optimizer must hold the sharded parameters
            model = resolve(manifest.parallelize, "parallelize function")(model) or model
        optimizer = build_optimizer(manifest.optimizer, model, recorded_groups(ckpt))
        loss_fn = build_loss(manifest.loss, **loss_overrides)
        step_fn = resolve(manifest.step, "step function") if manifest.step else default_step
    if manifest.parallelize:
        # DCP takes ~0.6 s to import: imported by FSDP runs only
        from energydiag.engine.sharded import load_sharded

        load_sharded(ckpt.path, model, optimizer)
    else:
        load_checkpoint(ckpt, model, optimizer)
    model = for_replay(model, manifest.distributed)
    session = Session(
        run,
        model,
        optimizer,
        loss_fn,
        device,
        start,
        manifest.grad_clip,
        manifest.autocast_dtype,
        step_fn,
        bool(ckpt.optim) or "param_groups" in ckpt.meta,  # an empty state is still a state
        _scaler(manifest.scaler, device),
        loss_kwargs={**manifest.loss.kwargs, **loss_overrides},
        base_hyperparameters=hyperparameters(optimizer),
    )
    rank, here = rank_and_world()
    if manifest.parallelism in ("ddp", "fsdp") and here < manifest.world_size:
        session.play_ranks(played_ranks(run, here, rank))
    return session


def recorded_groups(ckpt: Checkpoint) -> list[list[str]] | None:
    """Parameter names per param group as recorded: the optimizer may hold several groups, or
    only some of the model's parameters (a frozen backbone)."""
    groups = parse_groups(ckpt.path, ckpt.meta, "param_groups")
    if groups is None:
        return None
    if not all(isinstance(g.get("params"), list) for g in groups):
        raise DiagError(ckpt.path, "metadata 'param_groups' must list each group's 'params'")
    return [[str(n) for n in g["params"]] for g in groups]


def _scaler(settings: dict[str, float] | None, device: torch.device) -> torch.amp.GradScaler | None:
    if settings is None:
        return None
    return torch.amp.GradScaler(device.type, **settings)


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
