"""Small models trained by Lightning and the Hugging Face Trainer in the integration tests.

Each standardises its input per sample before a dropout MLP: a sample whose features are all
equal has std 0, so (x - mean) / std is 0/0 in module 'norm' — the fault the tests plant.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from energydiag.reference.models import EnergyModel

FEATURES = 6


class Standardise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)


class Regressor(nn.Module):
    def __init__(self, hidden: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = Standardise()
        self.body = nn.Sequential(
            nn.Linear(FEATURES, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        pred = self.body(self.norm(x)).squeeze(-1)
        out = {"pred": pred}
        if labels is not None:
            out["loss"] = nn.functional.mse_loss(pred, labels)
        return out


def regression_data(
    n: int = 96, constant_row: int | None = None, seed: int = 3, spike_row: int | None = None
):
    """Features and targets; ``constant_row`` gets identical features (std 0), ``spike_row`` a
    target ×1e3 (one bad label: a gradient spike each time its batch comes round)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = x @ torch.linspace(-1, 1, FEATURES) + 0.1 * torch.randn(n, generator=g)
    if constant_row is not None:
        x[constant_row] = 0.5
    if spike_row is not None:
        y[spike_row] *= 1e3
    return x, y


def lr_ramp(optimizer: torch.optim.Optimizer, ramp: float):
    """The planted lr ramp: ×``ramp`` per step from step 10 (None without one)."""
    if not ramp:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: ramp ** max(0, s - 10))


class RegressionSet(torch.utils.data.Dataset):
    """Dict samples, as the Hugging Face Trainer's default collator expects."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class TiedLM(nn.Module):
    """A language model whose output layer is its embedding (one Parameter, two names)."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["ids"][:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), batch["ids"][:, 1:].flatten())


def hf_arguments(output_dir, steps: int, batch: int, **overrides):
    """The Hugging Face Trainer's arguments for a short CPU run that writes nothing of its own."""
    import transformers

    quiet = {"report_to": [], "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True}
    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        use_cpu=True,
        **(quiet | overrides),
    )


def swap_infonce(energy: nn.Module, batch: dict[str, torch.Tensor], tau: float) -> torch.Tensor:
    """The seed team's in-batch loss, written out: every context against every action, the
    diagonal the target."""
    h, a, mask = batch["h"], batch["a_pos"], batch["pad_mask"]
    b = h.shape[0]
    e = energy(h.repeat_interleave(b, 0), a.repeat(b, 1, 1), mask.repeat_interleave(b, 0))
    return nn.functional.cross_entropy(-e.view(b, b) / tau, torch.arange(b))


class SwapEnergy(nn.Module):
    """An energy model as the Hugging Face Trainer sees it: ``model(**batch)["loss"]``."""

    def __init__(self, tau: float = 0.5, **model_kwargs) -> None:
        super().__init__()
        self.tau, self.energy = tau, EnergyModel(**model_kwargs)

    def forward(self, h, a_pos, pad_mask) -> dict[str, torch.Tensor]:
        batch = {"h": h, "a_pos": a_pos, "pad_mask": pad_mask}
        return {"loss": swap_infonce(self.energy, batch, self.tau)}


class SplitLinear(nn.Linear):
    """A Linear whose inner product is summed in two halves (``mm``, ``mm``, ``add``, ``add``)
    where ``nn.Linear`` runs one fused ``addmm``: the same weights and the same function, other
    ops, another rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.in_features // 2
        low = x[..., :half] @ self.weight[:, :half].T
        return low + x[..., half:] @ self.weight[:, half:].T + self.bias


class SplitEnergyModel(EnergyModel):
    """The reference energy model with ``act_in`` split, as another torch version or a
    refactor might compute it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.act_in = SplitLinear(self.act_in.in_features, self.act_in.out_features)
