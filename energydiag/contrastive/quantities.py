"""What a replay measures of an energy model's step: the energies its loss scored.

``STANDARD`` is the engine's own set plus these: the set replay and what-if measure. On a model
whose loss scores no energies, ``EnergyStats`` measures nothing and adds no column.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from energydiag.engine.quantities import DEFAULT, Quantity, Values
from energydiag.engine.step import StepResult


class EnergyStats(Quantity):
    """The energies the loss scored: range, positives vs negatives, retrieval, logit spread."""

    columns_ = {  # shown in tables; every statistic is in the JSON and --metrics-out
        "energy_min": ("E min", ".3g"),
        "energy_max": ("E max", ".3g"),
        "logit_spread": ("logits", ".3g"),
    }

    def compute(
        self, model: nn.Module, result: StepResult, loss_kwargs: Mapping[str, Any]
    ) -> Values:
        scored = scored_energies(result.diagnostics)
        return energy_stats(scored[0], loss_kwargs.get("tau"), scored[1]) if scored else {}


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


STANDARD: tuple[type[Quantity], ...] = (EnergyStats, *DEFAULT)
