"""Processes the distributed tests start (torch.multiprocessing, gloo on CPU). Each function is
a training loop a user would write; energydiag only reads what it leaves on disk."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def fsdp_with_dcp_checkpoints(rank: int, world: int, port: int, out: str, blow_up_at: int) -> None:
    """FSDP2 (fully_shard) on a small MLP; a DCP checkpoint every 2 steps; from ``blow_up_at``
    the learning rate is 1e4, so the weights explode (finite) and then go NaN."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    init(rank, world, port)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    for step in range(12):
        if step % 2 == 0:
            msd, osd = get_state_dict(model, optimizer)
            save({"model": msd, "optim": osd}, checkpoint_id=str(Path(out) / f"step-{step}"))
        if step == blow_up_at:
            for group in optimizer.param_groups:
                group["lr"] = 1e4
        x = torch.randn(4, 8, generator=g)
        loss = (model(x) ** 2).mean() * (1e30 if step >= blow_up_at + 2 else 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    dist.destroy_process_group()
