"""Each module's output in execution order, and the gradient that flows back into it.

Forward hooks on every submodule summarise the first float output (overflow-safe); with
``grad_outputs`` a tensor hook adds up the squared gradient of that output in backward. This is
what `inspect` shows as the activation table: where values grow, where gradients vanish.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from energydiag.engine.tensorstats import TensorSummary, float_tensors, summarize


@dataclass
class ModuleOutput:
    path: str
    kind: str
    output: TensorSummary
    grad_norm: float | None = None


class ModuleOutputs:
    def __init__(self, model: nn.Module, grad_outputs: bool = True) -> None:
        self.model, self.grad_outputs = model, grad_outputs
        self.rows: list[ModuleOutput] = []
        self._grad_sq: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def attached(self) -> Iterator[ModuleOutputs]:
        handles = [
            module.register_forward_hook(self._hook(path or "<model>", type(module).__name__))
            for path, module in self.model.named_modules()
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def finish(self) -> list[ModuleOutput]:
        """Attach the gradient norms gathered in backward; call after loss.backward()."""
        for row in self.rows:
            sq = self._grad_sq.get(row.path)
            row.grad_norm = math.sqrt(float(sq)) if sq is not None else None
        return self.rows

    def _hook(self, path: str, kind: str):
        def hook(_module, _args, output):
            outs = float_tensors(output)
            if not outs:
                return
            self.rows.append(ModuleOutput(path, kind, summarize(outs[0])))
            if self.grad_outputs and outs[0].requires_grad:
                outs[0].register_hook(self._grad_hook(path))

        return hook

    def _grad_hook(self, path: str):
        def hook(grad: torch.Tensor) -> None:
            sq = grad.detach().double().pow(2).sum()
            self._grad_sq[path] = self._grad_sq.get(path, 0.0) + sq

        return hook
