"""Plug-ins for tests, importable by manifests as 'faulty:<name>' (conftest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from energydiag.reference.losses import energies, inbatch_infonce
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


def std_of_one_loss(model, batch, tau=0.5):
    """The seed report's bug: E_pos.std() after a mean is a std over one element (NaN)."""
    loss, diagnostics = inbatch_infonce(model, batch, tau=tau)
    e_pos = energies(model, batch["h"], batch["a_pos"], batch.get("pad_mask"))
    return loss + 0.1 * e_pos.mean().std(), diagnostics


def where_trap_loss(model, batch, tau=0.5):
    """A log guarded by where(): the discarded branch's NaN still poisons the gradient."""
    loss, diagnostics = inbatch_infonce(model, batch, tau=tau)
    e = energies(model, batch["h"], batch["a_pos"], batch.get("pad_mask"))
    shifted = e - e.detach().median()
    penalty = torch.where(shifted > 0, torch.log(shifted), torch.zeros_like(shifted))
    return loss + 0.01 * penalty.mean(), diagnostics


def scaled_loss(model, batch, tau=0.5):
    """InfoNCE times the batch's own 'scale': a data bug that makes every gradient huge."""
    loss, diagnostics = inbatch_infonce(model, batch, tau=tau)
    return loss * batch["scale"], diagnostics


def backwards_margin(model, batch, margin=0.5):
    """The seed report's hinge, relu(E_neg - E_pos + m): it pushes positives *up*."""
    e_pos = energies(model, batch["h"], batch["a_pos"], batch.get("pad_mask"))
    e_neg = energies(model, batch["h"], -batch["a_pos"], batch.get("pad_mask"))
    scored = torch.stack([e_pos, e_neg], dim=1)
    loss = torch.relu(e_neg - e_pos + margin).mean()
    return loss, {"candidate_energies": scored.detach()}


class ZeroGradNorm(torch.nn.Module):
    """sqrt(x²) at x = 0: finite forward, infinite derivative, NaN gradient behind it."""

    def forward(self, x):
        centred = x - x.detach()
        return x + torch.sqrt(centred * centred)


class BackwardNaNModel(EnergyModel):
    """The NaN appears in backward, inside the submodule 'fragile'."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fragile = ZeroGradNorm()

    def forward(self, h, a, pad_mask=None):
        return self.fragile(super().forward(h, a, pad_mask))


class GatedEnergy(torch.nn.Module):
    """A bounded head under another name: E = 0.1 + 2 * sigmoid(raw), in (0.1, 2.1)."""

    def forward(self, raw):
        return 0.1 + 2.0 * torch.sigmoid(raw)


class RenamedHeadModel(EnergyModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.head_out
        self.energy_gate = GatedEnergy()

    def forward(self, h, a, pad_mask=None):
        context = self.ctx_enc(self.ctx_in(h.float()))
        query = self.act_enc(self.act_in(a.float()))
        attended, _ = self.attn(query, context, context, key_padding_mask=pad_mask)
        raw = self.pred(query + attended).squeeze(-1).mean(dim=-1, keepdim=True)
        return self.energy_gate(raw)


class NonFiniteGuardModel(EnergyModel):
    """Raises when its own energies are non-finite, as the seed team's model did."""

    def forward(self, h, a, pad_mask=None):
        e = super().forward(h, a, pad_mask)
        if not torch.isfinite(e).all():
            raise RuntimeError("energy model produced non-finite energies")
        return e


MICRO_BATCHES = 4


def two_losses(model, micro, tau=0.5):
    """The seed team's pair: swap InfoNCE plus a (correctly signed) margin on rolled actions."""
    nce, _ = inbatch_infonce(model, micro, tau=tau)
    e_pos = energies(model, micro["h"], micro["a_pos"], micro.get("pad_mask"))
    e_neg = energies(model, micro["h"], micro["a_pos"].roll(1, dims=0), micro.get("pad_mask"))
    return nce + 0.1 * torch.relu(0.5 + e_pos - e_neg).mean()


def split(batch, parts=MICRO_BATCHES):
    """Each micro-batch sliced as it is used, as a loader's would arrive."""
    size = batch["h"].shape[0] // parts
    return ({k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts))


def accumulating_step(model, optimizer, batch, ctx):
    """A user's own step: two losses over 4 micro-batches, accumulated, then clip and step."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in split(batch):
        loss = two_losses(model, micro) / MICRO_BATCHES
        loss.backward()
        total = total + loss.detach()
    ctx.clip(model)
    if ctx.update:
        optimizer.step()
    return total


def compiled_energy_model(**kwargs):
    """A factory that compiles, as users do; the eager backend needs no C++ toolchain."""
    return torch.compile(EnergyModel(**kwargs), backend="eager")


def log_energy_loss(model, batch, tau=0.5):
    """-log E of the positives: an energy that reaches exactly 0 makes it infinite."""
    loss, diagnostics = inbatch_infonce(model, batch, tau=tau)
    e_pos = energies(model, batch["h"], batch["a_pos"], batch.get("pad_mask"))
    return loss - 0.01 * torch.log(e_pos).mean(), diagnostics


def eval_refiner(model, h, a0, pad_mask):
    """A user's refinement done right: eval mode, five gradient steps of 0.1 on the action."""
    from energydiag.reference.losses import energies

    model.eval()
    chain, a = [a0], a0.clone()
    for _ in range(5):
        a.requires_grad_(True)
        (grad,) = torch.autograd.grad(energies(model, h, a, pad_mask).sum(), a)
        a = (a - 0.1 * grad).detach()
        chain.append(a)
    return chain


class OwnFloat32Model(EnergyModel):
    """Multiplies by a float32 matrix it makes itself, whatever dtype its weights are in: `diff
    --against dtype=` cannot make it run in another dtype (autocast can)."""

    def forward(self, h, a, pad_mask=None):
        return super().forward(h, a, pad_mask) @ torch.ones(1, 1)
