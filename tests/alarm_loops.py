"""Hand-written loops for the live-alarm tests: a linear regression trained with plain SGD,
where an lr ×1e4 makes the weights grow geometrically until float32 squares overflow, and one
batch scaled ×1e4 is a gradient spike that, unskipped, sends the next step to inf."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from energydiag import Recorder

D = 4


class Regressor(nn.Module):
    """Linear (``hidden=0``: SGD divergence is geometric) or a ReLU MLP (a spike's huge
    weights multiply through its two layers and overflow a few steps later)."""

    def __init__(self, hidden: int = 0) -> None:
        super().__init__()
        layers = [nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, 1)] if hidden else []
        self.net = nn.Sequential(*layers) if hidden else nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def mse_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def record(
    root: Path,
    steps: int,
    *,
    lr: float = 1e-2,
    jump_at: int | None = None,
    spike_at: int | None = None,
    seed: int = 0,
    on_alarm: object = "warn",
    hidden: int = 0,
    spike: float = 1e4,
    persist: bool = False,
    monitors: list | None = None,
    checkpoint_every: int = 50,
) -> None:
    torch.manual_seed(seed)
    model = Regressor(hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    truth = torch.randn(D, generator=gen)
    with Recorder(
        root,
        model=model,
        optimizer=optimizer,
        model_spec={"target": "alarm_loops:Regressor", "kwargs": {"hidden": hidden}},
        loss={"target": "alarm_loops:mse_loss"},
        checkpoint_every=checkpoint_every,
        on_alarm=on_alarm,
        persist_batches=persist,
        monitors=monitors,
    ) as rec:
        for step in range(steps):
            x = torch.randn(16, D, generator=gen)
            batch = {"x": x * (spike if step == spike_at else 1.0), "y": x @ truth}
            rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            loss = mse_loss(model, batch)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
            rec.end_step(loss, grad_norm=norm)
            optimizer.step()
            if step == jump_at:
                for group in optimizer.param_groups:
                    group["lr"] *= 1e4
