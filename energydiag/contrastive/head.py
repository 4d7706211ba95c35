"""Find a bounded energy head by what it does, whatever its module is called.

One forward of the model under the instrument, with the ``OutputRange`` observer following the
last squashing op (sigmoid, tanh, hardtanh, clamp) through the affine arithmetic after it. If
the model's output is still tracked at the end, its range is the head's bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from energydiag.engine.instrument import Instrument
from energydiag.engine.observers import OutputRange


@dataclass
class Head:
    bounds: tuple[float, float]
    source: str  # e.g. "aten::sigmoid in 'head_out'"
    module: str

    @property
    def span(self) -> float:
        return self.bounds[1] - self.bounds[0]


def find_head(model: nn.Module, batch: dict[str, torch.Tensor]) -> Head | None:
    ranges = OutputRange()
    with torch.no_grad(), Instrument([ranges]).attached():
        out = model(batch["h"], batch["a_pos"], batch.get("pad_mask"))
    out = out[0] if isinstance(out, tuple | list) else out
    found = ranges.bounds_of(out) if isinstance(out, torch.Tensor) else None
    if found is None:
        return None
    (lo, hi), source = found
    return Head((lo, hi), source, ranges.modules.get(source, ""))


def head_module(model: nn.Module, head: Head | None, override: str | None) -> str | None:
    """The module path a what-if swaps: the named one, else the found head's own module."""
    if override is not None:
        return override
    if head is None or head.module in ("", "<model>"):
        return None
    return head.module if head.module in dict(model.named_modules()) else None
