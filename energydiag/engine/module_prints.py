"""Fingerprints of every module's output and every parameter's gradient, taken by hooks.

The per-op fingerprints (``engine/fingerprint.py``) need a dispatch mode, and under a dispatch
mode ``torch.compile`` runs eager: there is nothing compiled left to compare. Module hooks are
traced into the compiled graph instead (their reductions become extra graph outputs), so a
compiled model is watched as it runs. A module's output is comparable even where the ops inside
it differ (fused against decomposed), which is what pairs a compiled side with an eager one.

The hooks only append to lists: anything more (counting, reading a data pointer) would break
the graph and change what is compiled. Occurrences are counted when the lists are read back.
Gradients are taken where each one is accumulated, in the autograd engine's own order.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from energydiag.engine.fingerprint import OpPrint
from energydiag.engine.instrument import BACKWARD, FORWARD
from energydiag.engine.reductions import reduce64

Called = tuple[tuple[Any, ...], dict[str, Any], Any]  # a module call's args, kwargs, output


class ModulePrints:
    """Hooks on every module and parameter of ``model`` until ``detach``. With ``keep``, the
    calls of that module (args, kwargs and output, copied) are kept for a float64 re-run."""

    def __init__(self, model: nn.Module, keep: str | None = None) -> None:
        self.modules = [(name, type(m).__name__) for name, m in model.named_modules()]
        self.parameters = [name for name, _ in model.named_parameters()]
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self.grads: list[tuple[int, torch.Tensor]] = []
        self.kept: list[Called] = []
        self.handles = [
            module.register_forward_hook(self._forward(i, name == keep), with_kwargs=True)
            for i, (name, module) in enumerate(model.named_modules())
        ]
        self.handles += [
            p.register_post_accumulate_grad_hook(self._accumulated(i))
            for i, (_, p) in enumerate(model.named_parameters())
        ]

    def reset(self) -> None:
        """Start a step: the hooks stay (a compiled model would recompile for new ones)."""
        self.calls.clear()
        self.grads.clear()
        self.kept.clear()

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()

    def prints(self) -> list[OpPrint]:
        """The step's module outputs in the order they finished, then its gradients in the
        order they were accumulated; read back at once."""
        seen: Counter[str] = Counter()
        entries = []
        for i, outs, ins in self.calls:
            name, kind = self.modules[i]
            seen[name] += 1
            entry = OpPrint(len(entries), FORWARD, name, kind, seen[name])
            entry.outputs = outs.tolist()
            entry.inputs = [] if ins is None else ins.tolist()
            entry.parameters = [""] * len(entry.inputs)
            entries.append(entry)
        for i, grad in self.grads:
            name = self.parameters[i]
            seen[name] += 1
            entries.append(_gradient(len(entries), name, seen[name], [grad.tolist()]))
        return entries

    def _forward(self, index: int, keep: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            outs = _floats(out)
            if not outs:
                return
            self.calls.append((index, _reduced(outs), _reduced(_floats(args))))
            if keep:
                self.kept.append((copied(args), copied(kwargs), copied(out)))

        return hook

    def _accumulated(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self.grads.append((index, _reduced([param.grad])[0]))

        return hook


def _floats(obj: Any) -> list[torch.Tensor]:
    """The float tensors of a module's output or arguments, one level of tuple deep (as
    attention returns its output and weights): plain code that dynamo traces as it stands."""
    items = obj if isinstance(obj, (tuple, list)) else (obj,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]


def _reduced(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """[k, 2]: each tensor's float64 L2 norm and sum, reduced as the per-op fingerprints are
    (without their reused buffer: under compile it would be a global the graph writes)."""
    if not tensors:
        return None
    return torch.stack([torch.stack(reduce64(t)) for t in tensors])


def copied(obj: Any) -> Any:
    """Tensors copied out of a step (their storage may be reused or written later), in the
    tuples, lists and dicts that hold them: plain code, which dynamo traces in a hook."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(copied(o) for o in obj)
    if isinstance(obj, dict):
        return {k: copied(v) for k, v in obj.items()}
    return obj


def gradients_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient the step left, whole, in float64 on the CPU."""
    return {
        n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None
    }


def gradients_left(model: nn.Module) -> list[OpPrint]:
    """The gradients a step leaves in ``.grad`` (averaged across ranks under DDP, clipped when
    the run clips): what two executions still share when their ranks saw different shards."""
    entries: list[OpPrint] = []
    for name, param in model.named_parameters():
        if param.grad is not None:
            entries.append(_gradient(len(entries), name, 1, _reduced([param.grad]).tolist()))
    return entries


def _gradient(index: int, name: str, occurrence: int, reduced: list[list[float]]) -> OpPrint:
    """A parameter's gradient as a backward entry of its owning module."""
    entry = OpPrint(index, BACKWARD, name.rpartition(".")[0], f"grad {name}", occurrence)
    entry.outputs = reduced
    return entry
