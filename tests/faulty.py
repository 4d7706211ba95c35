"""Plug-ins for tests, importable by manifests as 'faulty:<name>' (conftest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from energydiag.reference.losses import energies
from energydiag.reference.models import EnergyModel


def sqrt_at_zero_loss(model, batch):
    """Finite forward, NaN backward: sqrt'(0) is inf, multiplied by a zero inner gradient."""
    e = energies(model, batch["h"], batch["a_pos"], batch.get("pad_mask"))
    centred = e - e.detach()  # exactly zero, yet differentiable
    return e.mean() + torch.sqrt(centred * centred).sum()


class GuardedEnergyModel(EnergyModel):
    """Like the seed team's model: raises instead of returning NaN on an all-masked row."""

    def forward(self, h, a, pad_mask=None):
        if pad_mask is not None and bool(pad_mask.all(dim=1).any()):
            raise RuntimeError("pad_mask has a row with every key masked")
        return super().forward(h, a, pad_mask)
