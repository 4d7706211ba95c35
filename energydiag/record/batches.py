"""What trainers hand over as a batch, as the flat tensor mapping a run stores, and back.

A run stores each batch as named tensors. Trainers pass dicts of tensors or tuples/lists of them
(``(x, y)``); a tuple is stored under ``batch.0``, ``batch.1``... and rebuilt on replay, so the
user's ``training_step`` sees the structure it was written for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from energydiag.engine.tensorstats import global_norm
from energydiag.errors import DiagError

ITEM = "batch."


def to_mapping(batch: Any) -> dict[str, torch.Tensor]:
    if isinstance(batch, Mapping):
        items = list(batch.items())
    elif isinstance(batch, list | tuple):
        items = [(f"{ITEM}{i}", v) for i, v in enumerate(batch)]
    else:
        raise DiagError(None, f"cannot record a {type(batch).__name__} batch: use a dict or tuple")
    odd = next((k for k, v in items if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise DiagError(None, f"cannot record batch entry {odd!r}: only tensors can be replayed")
    return {str(k): v for k, v in items}


def from_mapping(tensors: Mapping[str, torch.Tensor]) -> Any:
    """The batch as the trainer passed it: a tuple when every key is ``batch.N``."""
    if tensors and all(k.startswith(ITEM) and k[len(ITEM) :].isdigit() for k in tensors):
        return tuple(tensors[f"{ITEM}{i}"] for i in range(len(tensors)))
    return dict(tensors)


def tensors_only(values: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Keyword inputs a model received, without the non-tensor options (flags, None)."""
    return {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}


def import_target(obj: object) -> str:
    """``module:QualName`` of an object's class, refusing classes replay could not import."""
    cls = type(obj)
    target = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise DiagError(
            None,
            f"{target} cannot be imported at replay: move the class into a module, or pass "
            "model_spec={'target': 'pkg.module:factory', 'kwargs': {...}}",
        )
    return target


def gradient_norm(model: nn.Module) -> torch.Tensor:
    return global_norm([p.grad for p in model.parameters() if p.grad is not None])
