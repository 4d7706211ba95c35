"""Live quantities: what the monitors read, measured on the step's own tensors.

Each quantity owns its schedule (``every``), as Cockpit's do: the cheap ones measure every step,
the ones that copy or scan the optimizer's state every ``every`` steps. ``measure`` returns
device tensors (or floats); the Recorder stacks them with the loss and syncs the host once.

Quantities that know energy models (the bounded head's saturation, the logit spread, the loss
against chance) live in ``energydiag.contrastive.live``; the Recorder loads them by import
string from the engine's one registry (``engine/registry.py``), so this layer never imports
that one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from energydiag.engine.registry import LIVE_ENERGY, resolve
from energydiag.engine.tensorstats import plain
from energydiag.io.manifest import LossSpec, Manifest

Values = dict[str, torch.Tensor | float]


@dataclass
class EnergyTarget:
    """The energy model inside a model whose recorded loss is not an energy loss (a trainer's
    ``training_step``): the submodule whose output is the energy, and the InfoNCE or margin
    loss that step applies to it."""

    module: nn.Module
    loss: LossSpec


@dataclass
class Watched:
    """What a live quantity may look at: the rank's module, its optimizer, the manifest, and
    where the energy model is when the manifest's loss does not say."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    manifest: Manifest
    energy: EnergyTarget | None = None


def energy_target(model: nn.Module, energy: Mapping[str, Any] | None) -> EnergyTarget | None:
    """``{"module": "energy", "loss": {"name": "inbatch_infonce", "kwargs": {"tau": 0.5}}}``:
    the path of the energy submodule ('' for the model itself) and the loss it is trained
    with, for the energy rules under a trainer, whose step is its own."""
    if energy is None:
        return None
    unknown = set(energy) - {"module", "loss"}
    if unknown or "loss" not in energy:
        raise ValueError("energy= takes 'module' (a submodule path) and 'loss' (a loss spec)")
    path = energy.get("module", "")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"energy= module {path!r}: the model has no such submodule") from None
    return EnergyTarget(module, LossSpec.from_mapping(energy["loss"]))


class LiveQuantity:
    """``attach`` says whether it applies to this run (an Adam ratio needs an Adam-like
    optimizer); ``start`` sees the step's batch before its forward, ``measure`` its end,
    before ``optimizer.step()``."""

    name = "quantity"
    every = 1
    columns: tuple[str, ...] = ()

    def attach(self, watched: Watched) -> bool:
        self.watched = watched
        return True

    def start(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        """Before the step's forward."""

    def measure(self, step: int) -> Values:
        raise NotImplementedError

    def close(self) -> None:
        """Remove what ``attach`` hooked."""


class MaxAbsWeight(LiveQuantity):
    """The largest |w| of this rank's parameters (its shard's, under FSDP)."""

    name = "max_abs_weight"
    columns = ("max_abs_weight",)

    def measure(self, step: int) -> Values:
        params = weights(self.watched.model)
        if params and params[0].device.type != "cpu":  # one fused multi-tensor kernel
            return {"max_abs_weight": torch.nn.utils.get_total_norm(params, math.inf, foreach=True)}
        # on the CPU the foreach inf-norm is 5x slower than a min and max per tensor
        ends = torch.stack([torch.stack(torch.aminmax(p)) for p in params if p.numel()])
        return {"max_abs_weight": ends.abs().max()}


class UpdateRatio(LiveQuantity):
    """‖Δw‖ / ‖w‖ of one optimizer step, every ``every`` steps: the weights before the update
    are copied at the end of step s, compared at the start of step s + 1, and logged on row
    s + 1 (the row after the update it measures)."""

    name = "update_ratio"
    columns = ("update_ratio",)

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.before: list[torch.Tensor] | None = None
        self.ratio: torch.Tensor | None = None

    def start(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        if self.before is None:
            return
        now = weights(self.watched.model)
        delta = torch._foreach_sub(now, self.before)
        change = torch.nn.utils.get_total_norm(delta, foreach=True)
        self.ratio = change / torch.nn.utils.get_total_norm(self.before, foreach=True).clamp_min(
            1e-30
        )
        self.before = None

    def measure(self, step: int) -> Values:
        ratio, self.ratio = self.ratio, None
        if step % self.every == 0:
            self.before = [w.clone() for w in weights(self.watched.model)]
        return {} if ratio is None else {"update_ratio": ratio}


def weights(model: nn.Module) -> list[torch.Tensor]:
    """This rank's parameters as plain tensors (its shards, under FSDP)."""
    return [plain(p.detach()) for p in model.parameters()]


class AdamRatio(LiveQuantity):
    """Adam's g²/v̂: the step's squared gradient against the optimizer's bias-corrected second
    moment before it takes this step in. Near 1 while the gradients look like their history;
    far above it, Adam takes a step of many lr's (a batch unlike any before); far below, the
    gradient has died while v still remembers it."""

    name = "adam_ratio"
    columns = ("adam_ratio",)

    def __init__(self, every: int = 10) -> None:
        self.every = every

    def attach(self, watched: Watched) -> bool:
        super().attach(watched)
        return all("betas" in g for g in watched.optimizer.param_groups)

    def measure(self, step: int) -> Values:
        if step % self.every:
            return {}
        grads, sums, corrections = [], [], []
        for group in self.watched.optimizer.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                state = self.watched.optimizer.state.get(p, {})
                if p.grad is not None and "exp_avg_sq" in state:
                    grads.append(plain(p.grad.detach()))
                    sums.append(plain(state["exp_avg_sq"]))
                    corrections.append(1 - beta2 ** _as_number(state["step"]))
        if not grads:  # the optimizer's first step: no history yet
            return {}
        g2 = torch.nn.utils.get_total_norm(grads, foreach=True) ** 2
        per_param = torch.stack(torch._foreach_norm(sums, 1))  # v >= 0: its sum
        like = {"dtype": per_param.dtype, "device": per_param.device}
        on_host = all(isinstance(c, float) for c in corrections)
        scale = (
            torch.tensor(corrections, **like)
            if on_host
            else torch.stack([torch.as_tensor(c, **like) for c in corrections])
        )
        return {"adam_ratio": g2 / (per_param / scale).sum().clamp_min(1e-30)}


def _as_number(step: torch.Tensor | float) -> torch.Tensor | float:
    """Adam's step count: a float when it lives on the host (reading it costs no sync)."""
    if isinstance(step, torch.Tensor) and step.device.type == "cpu":
        return float(step)
    return step


def quantities_for(columns: set[str], watched: Watched) -> list[LiveQuantity]:
    """The quantities that measure what the monitors read, those that apply to this run."""
    energy = resolve(LIVE_ENERGY["quantities"], "live quantities")
    known = [MaxAbsWeight(), UpdateRatio(), AdamRatio(), *energy()]
    return [q for q in known if columns & set(q.columns) and q.attach(watched)]


def measure_all(quantities: list[LiveQuantity], step: int) -> dict[str, Any]:
    return {k: v for q in quantities for k, v in q.measure(step).items()}
