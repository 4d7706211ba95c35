"""Numbers measured on a training step, each a small class: what it needs, how it computes, how
it is labelled. Renderers read ``label`` and ``fmt`` from ``columns()`` instead of keeping their
own lists. ``DEFAULT`` holds the quantities of any model; what only energy models have lives in
``energydiag.contrastive.quantities``, and the caller chooses the set.

A quantity may bring an observer for the instrument (``observer``), take a snapshot before the
step (``before``), and returns 0-d tensors or floats from ``compute``, so a caller gathers many
and pays for one host sync. ``compute`` sees the loss's keyword arguments as the run recorded
them (a temperature among them, for a contrastive loss): the engine itself reads none.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from energydiag.engine.instrument import Observer
from energydiag.engine.observers import SaturationCounter
from energydiag.engine.step import StepResult
from energydiag.engine.tensorstats import global_norm

Values = dict[str, Any]


class Quantity:
    """Base: override what applies. ``columns`` maps a produced key to (label, format)."""

    columns_: ClassVar[dict[str, tuple[str, str]]] = {}

    def observer(self) -> Observer | None:
        return None

    def before(self, model: nn.Module) -> None:
        """Called before the step runs."""

    def compute(
        self, model: nn.Module, result: StepResult, loss_kwargs: Mapping[str, Any]
    ) -> Values:
        raise NotImplementedError

    @classmethod
    def columns(cls) -> dict[str, tuple[str, str]]:
        return dict(cls.columns_)


class SaturationFraction(Quantity):
    """The largest fraction of a squashing op's outputs within 1e-3 of its limits."""

    columns_ = {"saturation": ("sat.", ".1%")}

    def observer(self) -> Observer:
        self.counter = SaturationCounter()
        return self.counter

    def compute(
        self, model: nn.Module, result: StepResult, loss_kwargs: Mapping[str, Any]
    ) -> Values:
        rows = self.counter.rows()
        return {"saturation": max((s.fraction for s in rows), default=0.0)}


class UpdateRatio(Quantity):
    """||Δθ|| / ||θ||: ~1e-3 is typical, ≫1e-2 is a blow-up in waiting."""

    columns_ = {"update_ratio": ("Δθ/θ", ".3g")}

    def before(self, model: nn.Module) -> None:
        self.snapshot = [p.detach().clone() for p in model.parameters()]

    def compute(
        self, model: nn.Module, result: StepResult, loss_kwargs: Mapping[str, Any]
    ) -> Values:
        after = [p.detach() for p in model.parameters()]
        delta = torch._foreach_sub(after, self.snapshot)
        ratio = global_norm(delta) / global_norm(self.snapshot).clamp_min(1e-30)
        return {"update_ratio": ratio}


class LayerGradNorms(Quantity):
    """Gradient norm per layer: which layer explodes, and which receives exactly nothing."""

    columns_ = {}

    def compute(
        self, model: nn.Module, result: StepResult, loss_kwargs: Mapping[str, Any]
    ) -> Values:
        named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        return {f"grad_norm/{k}": v for k, v in by_layer(named).items()}


class LayerMaxAbs(Quantity):
    """max|w| per layer after the step: the growth bisect's checkpoint judge measures, step by
    step, so a replay can name the step at which a layer crossed the explosion limit."""

    columns_ = {}

    def compute(
        self, model: nn.Module, result: StepResult, loss_kwargs: Mapping[str, Any]
    ) -> Values:
        named = [(n, p.detach()) for n, p in model.named_parameters() if p.numel()]
        layers = by_layer(named, reduce=lambda ts: torch.stack([t.abs().amax() for t in ts]).amax())
        return {f"max_abs/{k}": v for k, v in layers.items()}


DEFAULT: tuple[type[Quantity], ...] = (SaturationFraction, UpdateRatio, LayerGradNorms)
CHEAP_COLUMNS = {
    "loss": ("loss", ".4g"),
    "logged_loss": ("logged", ".4g"),
    "grad_norm": ("|g|", ".3g"),
    "param_norm": ("|θ|", ".4g"),
}


def columns(quantities: tuple[type[Quantity], ...] = DEFAULT) -> dict[str, tuple[str, str]]:
    """Every column a replay table may hold, in display order, with its label and format."""
    out = dict(CHEAP_COLUMNS)
    for q in quantities:
        out |= q.columns()
    return out


def layer_of(param_name: str) -> str:
    """'pred.0.fc1.weight' -> 'pred.0.fc1': parameters grouped by the module that owns them."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else "<model>"


def by_layer(
    named: list[tuple[str, torch.Tensor]],
    reduce: Callable[[list[torch.Tensor]], torch.Tensor] = global_norm,
) -> dict[str, torch.Tensor]:
    """One value per layer (its L2 norm unless ``reduce`` says otherwise)."""
    groups: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, t in named:
        groups[layer_of(name)].append(t)
    return {layer: reduce(ts) for layer, ts in groups.items()}
