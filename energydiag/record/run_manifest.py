"""The manifest a Recorder writes: its arguments, the optimizer's settings, and the ranks."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from energydiag.engine.ranks import describe
from energydiag.errors import DiagError
from energydiag.io.layout import FORMAT_RANKS
from energydiag.io.manifest import Manifest, parse_manifest


def with_ranks(
    manifest: Manifest,
    model: nn.Module,
    parallelize: str | None,
    rank_checkpoints: bool,
    in_ddp: bool = False,
) -> Manifest:
    """A multi-rank run's manifest: version 2, the world, which parameters the ranks keep equal,
    and how to shard an FSDP model."""
    distributed = describe(model, in_ddp)
    if distributed is None:
        return manifest
    if distributed["parallelism"] in ("none", "mixed"):
        distributed["rank_checkpoints"] = rank_checkpoints
    if distributed["parallelism"] == "fsdp" and parallelize is None:
        raise DiagError(
            None, "an FSDP run needs parallelize='pkg.mod:fn', fn(model) sharding it as yours"
        )
    return replace(manifest, distributed=distributed, format=FORMAT_RANKS, parallelize=parallelize)


def recorded_manifest(
    model_spec: Mapping[str, Any],
    loss: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
    autocast_dtype: str | None,
    seed: int | None,
    optimizer_start_step: int,
    step: str | None,
) -> Manifest:
    accepted = inspect.signature(type(optimizer).__init__).parameters
    opt_kwargs = {
        k: v
        for k, v in optimizer.defaults.items()
        if k in accepted and isinstance(v, int | float | bool | tuple)
    }
    raw = {
        "format": "energydiag/1",
        "model": dict(model_spec),
        "loss": dict(loss),
        "optimizer": {
            "name": type(optimizer).__name__,
            "kwargs": opt_kwargs,
            "start_step": optimizer_start_step,
        },
        "grad_clip": grad_clip,
        "autocast_dtype": autocast_dtype,
        "seed": seed,
    }
    if step is not None:
        raw["step"] = step
    return parse_manifest(json.loads(json.dumps(raw)), "Recorder arguments")
