"""Do the ranks hold the same parameters? Each rank fingerprints every parameter (its float64
norm and sum) and the fingerprints are all-gathered: replicas kept equal by DDP give bitwise
equal fingerprints, copies that train apart differ by about as much as their weights do.

Cheap enough for every few steps: one pass over the parameters and one small all-gather.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TOP_LAYERS = 5


def fingerprints(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Parameter names and a [P, 2] float64 tensor of their norms and sums."""
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    rows = [torch.stack([p.double().norm(), p.double().sum()]) for _, p in named]
    return [n for n, _ in named], torch.stack(rows) if rows else torch.zeros(0, 2)


def compare(names: list[str], gathered: list[torch.Tensor]) -> dict[str, Any]:
    """Every rank's fingerprints, in rank order -> which ranks differ from rank 0, the largest
    relative spread of a parameter's norm across ranks, and the parameters that spread most."""
    stack = torch.stack([g.cpu() for g in gathered])  # [W, P, 2]
    same = (stack == stack[0]) | (stack.isnan() & stack[0].isnan())
    differing = [r for r in range(len(gathered)) if not bool(same[r].all())]
    norms = stack[..., 0]
    spread = (norms.amax(0) - norms.amin(0)) / norms.abs().amax(0).clamp_min(1e-300)
    spread = torch.where(norms.isfinite().all(0), spread, torch.full_like(spread, torch.inf))
    order = spread.argsort(descending=True)[:TOP_LAYERS].tolist()
    return {
        "equal": not differing,
        "ranks": differing,
        "max_relative": float(spread.max()) if len(names) else 0.0,
        "layers": {names[i]: float(spread[i]) for i in order if spread[i] > 0},
    }
