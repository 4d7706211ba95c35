"""The reference energy model from the seed report, rebuilt in our own code.

E(h, a, pad_mask): actions attend over context tokens, a per-step head scores each action step,
the scores are averaged, and an *output transform* maps the raw score to an energy. The transform
is a module at ``model.head_out`` so a what-if replay can swap it by module path.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """x + MLP(LayerNorm(x)): the encoder and head block of the seed architecture."""

    def __init__(self, width: int, hidden: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden or 2 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden or 2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class SigmoidEnergy(nn.Module):
    """E = sigmoid(raw) + eps, the original head: energies live in (eps, 1 + eps)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw) + self.eps


class ScaledSigmoidEnergy(nn.Module):
    """E = lo + (hi - lo) * sigmoid(raw): still bounded, but as wide as asked."""

    def __init__(self, lo: float = 0.1, hi: float = 10.0) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(raw)


class SoftplusEnergy(nn.Module):
    """E = scale * softplus(raw; beta) + eps: positive and unbounded above."""

    def __init__(self, beta: float = 1.0, scale: float = 1.0, eps: float = 1e-3) -> None:
        super().__init__()
        self.beta, self.scale, self.eps = beta, scale, eps

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.softplus(raw, beta=self.beta) + self.eps


class IdentityEnergy(nn.Module):
    """E = raw: unbounded both ways."""

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw


class ReluScaledEnergy(nn.Module):
    """E = scale * relu(raw) + eps: the seed report's proposal 1a."""

    def __init__(self, scale: float = 10.0, eps: float = 1e-3) -> None:
        super().__init__()
        self.scale, self.eps = scale, eps

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.relu(raw) + self.eps


HEADS: dict[str, type[nn.Module]] = {
    "sigmoid": SigmoidEnergy,
    "scaled_sigmoid": ScaledSigmoidEnergy,
    "softplus": SoftplusEnergy,
    "identity": IdentityEnergy,
    "relu_scaled": ReluScaledEnergy,
}


def make_head(name: str, **kwargs: float) -> nn.Module:
    if name not in HEADS:
        raise ValueError(f"unknown energy head {name!r}; choose one of {', '.join(HEADS)}")
    return HEADS[name](**kwargs)


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: width // 2])
    return table


class EnergyModel(nn.Module):
    """Cross-attention energy model: low energy = the action fits the context."""

    def __init__(
        self,
        d_context: int,
        d_action: int,
        d_model: int = 32,
        n_heads: int = 2,
        n_blocks: int = 1,
        horizon: int = 8,
        head: str = "sigmoid",
        head_kwargs: dict[str, float] | None = None,
        positional: bool = True,
        dropout: float = 0.0,
        head_bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.ctx_in = nn.Linear(d_context, d_model)
        self.ctx_enc = nn.Sequential(*(ResidualMLP(d_model) for _ in range(n_blocks)))
        self.act_in = nn.Linear(d_action, d_model)
        self.act_enc = nn.Sequential(*(ResidualMLP(d_model) for _ in range(n_blocks)))
        self.register_buffer(
            "positions", sinusoidal_positions(horizon, d_model) if positional else None
        )
        self.pos_drop = nn.Dropout(dropout)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.pred = nn.Sequential(ResidualMLP(d_model), nn.Linear(d_model, 1))
        nn.init.constant_(self.pred[-1].bias, head_bias_init)
        self.head_out = make_head(head, **(head_kwargs or {}))

    def forward(
        self, h: torch.Tensor, a: torch.Tensor, pad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        dtype = self.ctx_in.weight.dtype  # the model's own: float32 as trained, or as replayed
        context = self.ctx_enc(self.ctx_in(h.to(dtype)))
        query = self.act_in(a.to(dtype))
        if self.positions is not None:
            query = query + self.positions[: query.shape[1]]
        query = self.act_enc(self.pos_drop(query))
        # Default need_weights=True, as in the seed model: this path returns NaN for a row whose
        # keys are all masked, which is exactly the failure energydiag must be able to localise.
        attended, _ = self.attn(query, context, context, key_padding_mask=pad_mask)
        raw_steps = self.pred(query + attended).squeeze(-1)
        return self.head_out(raw_steps.mean(dim=-1, keepdim=True))


def head_span(head: str, head_kwargs: dict[str, float] | None = None) -> float | None:
    """The energy span a reference head allows, from its configuration alone (no model built):
    1 for the sigmoid, hi - lo for the scaled sigmoid, None for the unbounded heads."""
    kwargs = head_kwargs or {}
    if head == "sigmoid":
        return 1.0
    if head == "scaled_sigmoid":
        return float(kwargs.get("hi", 10.0)) - float(kwargs.get("lo", 0.1))
    return None
