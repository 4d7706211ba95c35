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


def describe(model: nn.Module, in_ddp: bool = False) -> dict[str, Any] | None:
    """The manifest's ``distributed`` entry for a model trained by several ranks: which of its
    parameters are kept equal across ranks, and how (a plain module is each rank's own copy).
    ``in_ddp``: ``model`` is the module a DDP wrapper out of sight keeps equal (a trainer's)."""
    rank, world = rank_and_world()
    if world == 1:
        return None
    sync = {"": "ddp"} if in_ddp else synchronisation(model)
    kinds = set(sync.values())
    parallelism = kinds.pop() if len(kinds) == 1 else "mixed"
    return {
        "world_size": world,
        "backend": dist.get_backend(),
        "parallelism": parallelism,
        "sync": sync,
    }


def synchronisation(model: nn.Module) -> dict[str, str]:
    """Module path -> 'ddp' | 'fsdp' for the outermost wrapped modules, and '' -> 'none' when
    some parameters sit outside all of them (the model itself is path '')."""
    wrapped: dict[str, str] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") or not outer for outer in wrapped):
            continue
        if isinstance(module, nn.parallel.DistributedDataParallel):
            wrapped[name] = "ddp"
        elif is_sharded(module):
            wrapped[name] = "fsdp"
    covered = tuple(f"{outer}." for outer in wrapped)
    if "" not in wrapped and any(not n.startswith(covered) for n, _ in model.named_parameters()):
        wrapped[""] = "none"
    return wrapped


def is_sharded(model: nn.Module) -> bool:
    """An FSDP2 (``fully_shard``) model, where this torch has FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


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


def gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's same-shaped ``tensor``, in rank order (a collective)."""
    if not in_group():
        return [tensor]
    local = tensor.to(_flag_device())
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return out


def check_world(distributed: dict[str, Any] | None) -> None:
    """A replay in a process group must have the recorded world or divide it (each process then
    plays several recorded ranks in turn); one process replays any run."""
    if distributed is None or distributed["parallelism"] == "none":
        return
    if distributed["parallelism"] == "mixed":
        raise DiagError(
            None,
            "the run's model is partly wrapped (manifest 'sync'): its replay is not supported yet; "
            "diagnose, curves and inspect read its records",
        )
    world, here = distributed["world_size"], rank_and_world()[1]
    if distributed["parallelism"] == "fsdp" and not in_group():
        raise DiagError(
            None,
            "an FSDP run replays under torch.distributed (its sharding needs a process group): "
            "`energydiag replay` launches it, on 1 process if you ask",
        )
    if here > 1 and world % here:
        raise DiagError(
            None,
            f"the run was recorded by {world} ranks and this replay has {here}: the replay's "
            f"ranks must divide the recorded ones",
        )


def for_replay(model: nn.Module, distributed: dict[str, Any] | None) -> nn.Module:
    """DDP around a model rebuilt for a multi-rank DDP replay, so that backward all-reduces the
    gradients as the recorded run did (an FSDP model is sharded by the run's own function)."""
    if distributed is None or distributed["parallelism"] != "ddp" or not in_group():
        return model
    return nn.parallel.DistributedDataParallel(model)


def collective_order(distributed: dict[str, Any] | None, played: int = 1) -> list[str]:
    """Why a multi-rank replay need not match its recording bit for bit even with every state
    restored: the rebuilt reducer (DDP's buckets, FSDP's reduce-scatter), or a process playing
    several recorded ranks in turn, may sum the ranks' gradients in another order, a difference
    of float rounding (about 1e-7 relative)."""
    if not distributed or int(distributed.get("world_size", 1)) < 2:
        return []
    if distributed.get("parallelism") == "none":  # nothing was reduced across ranks
        return []
    how = "FSDP's reduce-scatter" if distributed.get("parallelism") == "fsdp" else "DDP's buckets"
    if played > 1:
        return [
            f"all-reduce order ({played} recorded ranks played in turn by one process: their "
            f"gradients summed in rank order, not in the order of {how})"
        ]
    return [f"all-reduce order ({how}, rebuilt for the replay, may sum the ranks in another order)"]
