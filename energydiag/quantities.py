"""Numbers computed from a model mid-step: energy statistics, gradient and update norms.

Each function returns 0-d tensors, not floats, so a caller can gather many quantities and pay
for a single host sync.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


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
    e = matrix.detach().float()
    b = e.shape[0]
    is_pos = torch.zeros_like(e, dtype=torch.bool)
    target = (
        torch.zeros(b, dtype=torch.long, device=e.device)
        if positive_first
        else torch.arange(b, device=e.device)
    )
    is_pos[torch.arange(b, device=e.device), target] = True
    pos, neg = e[is_pos], e[~is_pos]
    out = {
        "energy_min": e.min(),
        "energy_max": e.max(),
        "energy_mean": e.mean(),
        "energy_std": e.std(),
        "pos_mean": pos.mean(),
        "pos_std": pos.std() if b > 1 else torch.zeros(()),
        "neg_mean": neg.mean(),
        "neg_std": neg.std() if neg.numel() > 1 else torch.zeros(()),
        "pos_neg_gap": neg.mean() - pos.mean(),
        "retrieval_accuracy": (e.argmin(dim=1) == target).float().mean(),
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


def _by_layer(named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, t in named:
        groups[layer_of(name)].append(t)
    return {
        layer: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts)))
        for layer, ts in groups.items()
    }


def layer_grad_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    return _by_layer([(n, p.grad) for n, p in model.named_parameters() if p.grad is not None])


def layer_param_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    return _by_layer([(n, p.detach()) for n, p in model.named_parameters()])


def snapshot_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def update_ratio(model: nn.Module, before: list[torch.Tensor]) -> torch.Tensor:
    """||Δθ|| / ||θ|| over the whole model: ~1e-3 is typical, ≫1e-2 is a blow-up in waiting."""
    after = [p.detach() for p in model.parameters()]
    delta = torch._foreach_sub(after, before)
    num = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(delta)))
    den = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(before)))
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))
