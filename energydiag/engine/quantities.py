"""Numbers measured on a training step, each a small class: what it needs, how it computes, how
it is labelled. Replay, what-if and inspect use the same set; renderers read ``label`` and
``fmt`` from ``columns()`` instead of keeping their own lists. Adding one is one class here and
one line in ``DEFAULT``.

A quantity may bring an observer for the instrument (``observer``), take a snapshot before the
step (``before``), and returns 0-d tensors or floats from ``compute``, so a caller gathers many
and pays for one host sync.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
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

    def compute(self, model: nn.Module, result: StepResult, tau: float | None) -> Values:
        raise NotImplementedError

    @classmethod
    def columns(cls) -> dict[str, tuple[str, str]]:
        return dict(cls.columns_)


class EnergyStats(Quantity):
    """The energies the loss scored: range, positives vs negatives, retrieval, logit spread."""

    columns_ = {  # shown in tables; every statistic is in the JSON and --metrics-out
        "energy_min": ("E min", ".3g"),
        "energy_max": ("E max", ".3g"),
        "logit_spread": ("logits", ".3g"),
    }

    def compute(self, model: nn.Module, result: StepResult, tau: float | None) -> Values:
        scored = scored_energies(result.diagnostics)
        return energy_stats(scored[0], tau, scored[1]) if scored else {}


class SaturationFraction(Quantity):
    """The largest fraction of a squashing op's outputs within 1e-3 of its limits."""

    columns_ = {"saturation": ("sat.", ".1%")}

    def observer(self) -> Observer:
        self.counter = SaturationCounter()
        return self.counter

    def compute(self, model: nn.Module, result: StepResult, tau: float | None) -> Values:
        rows = self.counter.rows()
        return {"saturation": max((s.fraction for s in rows), default=0.0)}


class UpdateRatio(Quantity):
    """||Δθ|| / ||θ||: ~1e-3 is typical, ≫1e-2 is a blow-up in waiting."""

    columns_ = {"update_ratio": ("Δθ/θ", ".3g")}

    def before(self, model: nn.Module) -> None:
        self.snapshot = [p.detach().clone() for p in model.parameters()]

    def compute(self, model: nn.Module, result: StepResult, tau: float | None) -> Values:
        after = [p.detach() for p in model.parameters()]
        delta = torch._foreach_sub(after, self.snapshot)
        ratio = global_norm(delta) / global_norm(self.snapshot).clamp_min(1e-30)
        return {"update_ratio": ratio}


class LayerGradNorms(Quantity):
    """Gradient norm per layer: which layer explodes, and which receives exactly nothing."""

    columns_ = {}

    def compute(self, model: nn.Module, result: StepResult, tau: float | None) -> Values:
        named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        return {f"grad_norm/{k}": v for k, v in by_layer(named).items()}


class LayerMaxAbs(Quantity):
    """max|w| per layer after the step: the growth bisect's checkpoint judge measures, step by
    step, so a replay can name the step at which a layer crossed the explosion limit."""

    columns_ = {}

    def compute(self, model: nn.Module, result: StepResult, tau: float | None) -> Values:
        named = [(n, p.detach()) for n, p in model.named_parameters() if p.numel()]
        layers = by_layer(named, reduce=lambda ts: torch.stack([t.abs().amax() for t in ts]).amax())
        return {f"max_abs/{k}": v for k, v in layers.items()}


DEFAULT: tuple[type[Quantity], ...] = (EnergyStats, SaturationFraction, UpdateRatio, LayerGradNorms)
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


def scored_energies(diagnostics: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool] | None:
    """The energies a loss scored, and whether positives sit in column 0 (else on the diagonal)."""
    if "energy_matrix" in diagnostics:
        return diagnostics["energy_matrix"], False
    if "candidate_energies" in diagnostics:
        return diagnostics["candidate_energies"], True
    return None


def energy_stats(
    matrix: torch.Tensor, tau: float | None, positive_first: bool = False
) -> dict[str, torch.Tensor]:
    """Statistics of the energies a loss scored: rows are contexts; the positive is on the
    diagonal of a [B, B] in-batch matrix, or in column 0 of [B, 1 + M] candidates."""
    e = matrix.detach().double()
    b = e.shape[0]
    is_pos = torch.zeros_like(e, dtype=torch.bool)
    target = (
        torch.zeros(b, dtype=torch.long, device=e.device)
        if positive_first
        else torch.arange(b, device=e.device)
    )
    is_pos[torch.arange(b, device=e.device), target] = True
    pos, neg = e[is_pos], e[~is_pos]
    zero = e.new_zeros(())
    # Paired per row: each context's mean negative minus its own positive.
    row_gap = (e.sum(dim=1) - pos) / max(e.shape[1] - 1, 1) - pos
    out = {
        "energy_min": e.min(),
        "energy_max": e.max(),
        "energy_mean": e.mean(),
        "energy_std": e.std() if e.numel() > 1 else zero,
        "pos_mean": pos.mean(),
        "pos_std": pos.std() if pos.numel() > 1 else zero,
        "neg_mean": neg.mean() if neg.numel() else zero,
        "neg_std": neg.std() if neg.numel() > 1 else zero,
        "pos_neg_gap": (neg.mean() - pos.mean()) if neg.numel() else zero,
        "pos_neg_gap_row_std": row_gap.std() if b > 1 else zero,
        "retrieval_accuracy": (e.argmin(dim=1) == target).double().mean(),
        "candidates": torch.tensor(float(e.shape[1]), dtype=torch.float64),
    }
    if tau is not None:
        logits = -e / tau
        row_spread = logits.max(dim=1).values - logits.min(dim=1).values
        out["logit_spread"] = logits.max() - logits.min()
        out["logit_spread_row_mean"] = row_spread.mean()
        out["logit_spread_row_max"] = row_spread.max()
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
