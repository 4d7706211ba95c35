"""What the Recorder and replay need from torch.distributed: who we are, agreeing across
ranks, and DDP around the model. Every function is a no-op in a single process, so the same
code records and replays one rank or many.

Collectives here run on every rank in the same order (a step's health, a replay's decision to
stop and localise), which is what keeps the ranks of a replay in lockstep.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from energydiag.errors import DiagError


def in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if in_group() else (0, 1)


def unwrap(model: nn.Module) -> nn.Module:
    """The module DDP wraps: its parameters and state dict are the replicas' own."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def describe(model: nn.Module) -> dict[str, Any] | None:
    """The manifest's ``distributed`` entry for a model trained by several ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return None
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise DiagError(
            None,
            f"the Recorder records DistributedDataParallel runs; {type(model).__name__} is not "
            "one (FSDP: save DCP checkpoints and read them with inspect, timeline and bisect)",
        )
    return {"world_size": world, "backend": dist.get_backend(), "parallelism": "ddp"}


def _flag_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def flagged_ranks(flag: bool) -> list[int]:
    """The ranks on which ``flag`` is True (a collective: every rank must call it)."""
    return [r for r, code in enumerate(rank_codes(int(flag))) if code]


def rank_codes(code: int) -> list[int]:
    """Every rank's small integer ``code``, in rank order (a collective)."""
    rank, world = rank_and_world()
    if world == 1:
        return [code]
    votes = torch.zeros(world, dtype=torch.int32, device=_flag_device())
    votes[rank] = code
    dist.all_reduce(votes)
    return votes.tolist()


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` on every rank, in rank order."""
    if not in_group():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def for_replay(model: nn.Module, distributed: dict[str, Any] | None) -> nn.Module:
    """DDP around a model rebuilt for a multi-rank replay, so that backward all-reduces the
    gradients as the recorded run did. The world must be the recorded one: each rank replays
    its own logged batches."""
    if distributed is None:
        return model
    world = distributed["world_size"]
    if rank_and_world()[1] != world:
        raise DiagError(
            None,
            f"the run was recorded by {world} ranks and this replay has "
            f"{rank_and_world()[1]}: `energydiag replay` and `diagnose` launch the {world} ranks "
            "(what-if and check --steps replay in one process)",
        )
    return nn.parallel.DistributedDataParallel(model)
