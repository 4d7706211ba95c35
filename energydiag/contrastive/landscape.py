"""The energy landscape a policy descends at inference: action refinement under E(h, a).

A refiner takes (model, h, a0, pad_mask) and yields the chain a_0, a_1, …, a_T. The built-in one
takes K gradient steps of size α on the action. Along the chain the energy is read in eval mode
(the landscape itself); dropout or batch-norm modules left in training mode *during* the
refinement are recorded by forward hooks, since that is what the refiner actually descended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from energydiag.reference.losses import energies

Refiner = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], list[torch.Tensor]]
STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
BATCH_STATS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LINE_POINTS = 64
RISE_NOISE = 1e-6  # a step "rises" when E grows by more than this, relative to |E|


def gradient_refiner(steps: int, alpha: float) -> Refiner:
    """a ← a − α ∂E/∂a, K times: the common correction step."""

    def refine(model, h, a0, pad_mask):
        chain, a = [a0.detach()], a0.detach().clone()
        for _ in range(steps):
            a.requires_grad_(True)
            grad = torch.autograd.grad(energies(model, h, a, pad_mask).sum(), a)[0]
            a = (a - alpha * grad).detach()
            chain.append(a)
        return chain

    return refine


@contextmanager
def training_modules_seen(model: nn.Module) -> Iterator[set[str]]:
    """Names of dropout / batch-norm modules that ran in training mode while the block ran."""
    seen: set[str] = set()
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: seen.add(name) if m.training else None
        )
        for name, module in model.named_modules()
        # a dropout of p = 0 changes nothing in either mode
        if isinstance(module, BATCH_STATS) or (isinstance(module, STOCHASTIC) and module.p > 0)
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def eval_energy(model: nn.Module, h, a, pad_mask) -> torch.Tensor:
    """E per row with the model in eval mode, its own mode restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return energies(model, h, a, pad_mask).double()
    finally:
        model.train(was)


def mode_gap(model: nn.Module, h, a, pad_mask, seed: int = 0) -> torch.Tensor:
    """|E in train mode − E in eval mode| per row, on the same input (dropout's live effect)."""
    was = model.training
    try:
        model.train()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            live = energies(model, h, a, pad_mask).double()
    finally:
        model.train(was)
    return (live - eval_energy(model, h, a, pad_mask)).abs()


def chain_energies(model, h, chain, pad_mask) -> torch.Tensor:
    """[T + 1, B] eval-mode energies along the chain."""
    return torch.stack([eval_energy(model, h, a, pad_mask) for a in chain])


def rising_fraction(e: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of refinement steps whose energy rose beyond float noise."""
    steps = e[1:] - e[:-1]
    return (steps > RISE_NOISE * e[:-1].abs().clamp_min(1.0)).double().mean(0)


def straight_line(model, h, a0, a1, pad_mask, points: int = LINE_POINTS) -> dict[str, torch.Tensor]:
    """E on the segment a0 → a1 at ``points`` points: interior local minima per row and the
    largest |ΔE| / |Δa| (how steep the landscape is where the refiner jumped over it)."""
    t = torch.linspace(0, 1, points, dtype=a0.dtype)
    e = torch.stack([eval_energy(model, h, a0 + s * (a1 - a0), pad_mask) for s in t])
    de = (e[1:] - e[:-1]).abs()
    da = ((a1 - a0).reshape(a0.shape[0], -1).norm(dim=1).double() / (points - 1)).clamp_min(1e-300)
    inner = (e[1:-1] < e[:-2]) & (e[1:-1] < e[2:])
    return {"local_minima": inner.sum(0), "steepest": (de / da).max(0).values, "energy": e}


def action_gradient_norm(model, h, chain, pad_mask) -> torch.Tensor:
    """[T + 1, B] ‖∂E/∂a‖ along the chain, in eval mode."""
    was = model.training
    model.eval()
    try:
        norms = []
        for a in chain:
            a = a.detach().requires_grad_(True)
            grad = torch.autograd.grad(energies(model, h, a, pad_mask).sum(), a)[0]
            norms.append(grad.reshape(a.shape[0], -1).norm(dim=1).double())
        return torch.stack(norms)
    finally:
        model.train(was)
