"""Record a Hugging Face ``Trainer`` run from its callbacks.

    from energydiag.record.hf import EnergydiagCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[EnergydiagCallback()])

The run directory defaults to ``args.output_dir`` + ``/energydiag``.

The Trainer shows callbacks neither the batch nor the loss, so the callback reads both off the
model: a forward pre-hook takes each forward of a step (its keyword tensors; the first one's
RNG state, which the step starts from; with gradient accumulation each micro-batch, which the
Trainer scales by 1 / their number) and a forward hook takes the loss each returns. The
Trainer clips before ``on_pre_optimizer_step``, the last hook before the update, so when it
clips the norm the callback sees is the clipped one and is logged as ``clipped_grad_norm`` (a
non-finite value is still a failure: clipping by a non-finite norm leaves non-finite
gradients). An alarm is also appended to ``state.log_history``
(``{"energydiag_alarm": rule, ...}``) and asks the Trainer to log at that step.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.amp.grad_scaler import OptState
from transformers import TrainerCallback

from energydiag.engine.registry import resolve
from energydiag.errors import DiagError
from energydiag.record.accumulation import DIVISOR, STEP, micro_batch
from energydiag.record.batches import gradient_norm, import_target, tensors_only
from energydiag.record.recorder import Recorder

NAME = "energydiag"  # the run directory's name under args.output_dir


class EnergydiagCallback(TrainerCallback):
    """A flight recorder for ``transformers.Trainer``; keyword options are the Recorder's
    (``checkpoint_every``, ``keep_batches``, ``persist_batches``, ``overwrite``...).

    ``model_spec`` defaults to a ``PreTrainedModel``'s class and config. Supported: one
    process or DDP under torchrun (each rank records its own batches), gradient accumulation (for a model whose loss the Trainer scales: one without
    ``**kwargs`` in ``forward``), fp32, bf16 autocast, or fp16 with accelerate's GradScaler (on a
    GPU: on the CPU accelerate runs ``fp16=True`` in fp32); anything else is refused when training
    begins. An exception is not seen by Trainer callbacks: call ``callback.dump()`` from your own
    ``except`` to write the ring.
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
        self.scaler: torch.amp.GradScaler | None = None
        self._step: int | None = None  # set at step begin, taken by the step's first forward
        self._losses: list[torch.Tensor] = []
        self._micro = -1  # the forward of the open step; -1: none yet
        self._awaiting_loss = False
        self._alarms: list[Any] = []
        self._hooks: list[Any] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        _check_supported(args, model)
        self.scaler = getattr(optimizer, "scaler", None)  # accelerate's, only for fp16 on a GPU
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        self.run_dir = self.run_dir or Path(args.output_dir) / NAME
        self.accumulates = args.gradient_accumulation_steps > 1
        self.recorder = Recorder(
            self.run_dir,
            model=model,
            optimizer=optimizer,
            model_spec=self.model_spec or default_spec(model),
            loss={"target": "energydiag.record.hf:model_loss"},
            grad_clip=clip,
            autocast_dtype=_autocast_dtype(args, self.scaler),
            scaler=self.scaler,
            seed=args.seed,
            in_ddp=args.world_size > 1,  # the Trainer's DDP, which callbacks are never shown
            **({"step": STEP} if self.accumulates else {}),
            **self.options,
        )
        self.recorder.alarms.listeners.append(self._alarms.extend)
        self._hooks = [
            model.register_forward_pre_hook(self._take_inputs, with_kwargs=True),
            model.register_forward_hook(self._take_loss),
        ]

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._step, self._losses, self._micro = state.global_step, [], -1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        if self.recorder is None or not self._losses:
            return
        count = len(self._losses)
        if self.accumulates:  # the Trainer divides by the micro-batches in this window
            self.recorder.add_to_step({DIVISOR: torch.tensor(float(count))})
        name = "clipped_grad_norm" if self.recorder.manifest.grad_clip else "grad_norm"
        loss = sum(loss / count for loss in self._losses)  # in replay's order: bit-exact
        self.recorder.end_step(loss, **{name: self._unscaled_norm(model)})
        self._losses, self._step = [], None
        for alarm in self._alarms:  # the Trainer's log, and its integrations at this step
            state.log_history.append(
                {"step": alarm.step, "energydiag_alarm": alarm.rule, "message": alarm.message}
            )
        control.should_log = control.should_log or bool(self._alarms)
        self._alarms.clear()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        for hook in self._hooks:
            hook.remove()
        if self.recorder is not None:
            self.recorder.close()

    def dump(self, reason: str = "exception", **evidence: Any) -> None:
        if self.recorder is not None:
            self.recorder.dump(reason, **evidence)

    def _unscaled_norm(self, model: nn.Module) -> torch.Tensor:
        """The Trainer unscales before clipping (transformers 5 always, to log the norm); where
        it did not, the gradients still carry the loss scale. The scaler's own per-optimizer
        stage says which: there is no public accessor for it."""
        norm = gradient_norm(model)
        if self.scaler is None:
            return norm
        state = self.scaler._per_optimizer_states.get(id(self.recorder.optimizer), {})
        if state.get("stage") is OptState.UNSCALED:
            return norm
        return norm / self.scaler.get_scale()  # a power of 2: exact

    def _take_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._step is None or self.recorder is None:
            return
        if args:
            raise DiagError(None, "EnergydiagCallback records keyword inputs (model(**batch)) only")
        self._micro += 1
        tensors = tensors_only(kwargs)
        if not self.accumulates:
            self.recorder.start_step(self._step, tensors)
            self._step = None  # later forwards in this step (an eval, a generate) are not it
        elif self._micro == 0:
            self.recorder.start_step(self._step, micro_batch(0, tensors))
        else:
            self.recorder.add_to_step(micro_batch(self._micro, tensors))
        self._awaiting_loss = True

    def _take_loss(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._awaiting_loss:
            self._losses.append(loss_of(output).detach())
            self._awaiting_loss = False


def _check_supported(args: Any, model: nn.Module) -> None:
    scales_itself = any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(model.forward).parameters.values()
    )
    refusals = {
        f"gradient_accumulation_steps={args.gradient_accumulation_steps} on a model whose "
        "forward takes **kwargs (it scales its own loss by num_items_in_batch)": (
            args.gradient_accumulation_steps != 1 and scales_itself
        ),
        # under torchrun the Trainer wraps the model in DDP, unless one of these shards it
        f"world_size={args.world_size} under FSDP or DeepSpeed": (
            args.world_size != 1 and bool(args.fsdp or args.deepspeed)
        ),
        f"{args.n_gpu} GPUs in one process (DataParallel)": args.n_gpu > 1,
    }
    refused = [what for what, bad in refusals.items() if bad]
    if refused:
        raise DiagError(None, f"EnergydiagCallback cannot record a run with {', '.join(refused)}")


def _autocast_dtype(args: Any, scaler: torch.amp.GradScaler | None) -> str | None:
    """What accelerate autocasts to: float16 only where it made a scaler for it, because on the
    CPU it runs ``fp16=True`` with neither."""
    if args.fp16 and scaler is not None:
        return "float16"
    return "bfloat16" if args.bf16 else None


def loss_of(output: Any) -> torch.Tensor:
    """The loss as the Trainer takes it: ``output["loss"]`` from a mapping, else ``output[0]``."""
    loss = output.get("loss") if isinstance(output, Mapping) else output[0]
    if not isinstance(loss, torch.Tensor):
        raise DiagError(None, "the model returned no loss: give it labels in the batch")
    return loss


def default_spec(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise DiagError(
            None, f"{type(model).__name__} has no HF config: pass model_spec to EnergydiagCallback"
        )
    kwargs = {"model": import_target(model), "config": json.loads(config.to_json_string())}
    return {"target": "energydiag.record.hf:from_config", "kwargs": kwargs}


def from_config(model: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a ``PreTrainedModel`` from its class and config (weights come from checkpoints)."""
    cls = resolve(model, "model class")
    return cls(cls.config_class.from_dict(config))


def model_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss replay uses: the model on the recorded keyword inputs, as the Trainer calls it."""
    return loss_of(model(**batch))
