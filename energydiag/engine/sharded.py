"""FSDP2 runs: checkpoints saved and loaded through torch.distributed.checkpoint (DCP).

Saving is DCP's own (``get_state_dict`` + ``save``, one shard file per rank) plus a small
``energydiag.json`` beside the shards. Loading is DCP's own too, so a checkpoint reshards into
whatever sharding the replay's model has; only the metadata read is ours (the allowlist
unpickler of ``energydiag.io.dcp``), and only tensor entries are requested, so DCP never
unpickles a non-tensor entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, load, save
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from energydiag.io.atomic import write_text_atomic
from energydiag.io.dcp import read_metadata
from energydiag.io.layout import FORMAT, SIDECAR


class _AllowlistReader(FileSystemReader):
    """DCP's filesystem reader, with .metadata read by our allowlist unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save_sharded(
    folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, lead: bool
) -> Path:
    """A collective: every rank writes its shard; the lead writes the sidecar."""
    msd, osd = get_state_dict(model, optimizer)
    save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    if lead:
        groups = [
            {k: v for k, v in g.items() if isinstance(v, int | float | str | list | tuple)}
            for g in osd["param_groups"]
        ]
        sidecar = {
            "format": FORMAT,
            "kind": "checkpoint",
            "step": str(step),
            "param_groups": groups,
        }
        write_text_atomic(folder / SIDECAR, json.dumps(sidecar) + "\n")
    return folder


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A collective: load the model and optimizer tensors into the model's current sharding."""
    msd, osd = get_state_dict(model, optimizer)
    load({"model": msd, "optim": {"state": osd["state"]}}, storage_reader=_AllowlistReader(folder))
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
