"""Fingerprints of every module's output and every parameter's gradient, taken by hooks.

The per-op fingerprints (``engine/fingerprint.py``) need a dispatch mode, and under a dispatch
mode ``torch.compile`` runs eager: there is nothing compiled left to compare. Module hooks are
traced into the compiled graph instead (their reductions become extra graph outputs), so a
compiled model is watched as it runs. A module's output is comparable even where the ops inside
it differ (fused against decomposed), which is what pairs a compiled side with an eager one.

The hooks only append to lists: anything more (counting, reading a data pointer) would break
the graph and change what is compiled. Occurrences are counted when the lists are read back.
Gradients are taken where each one is accumulated, in the autograd engine's own order. The
loss (computed outside the model, as a rule), the parameters and the optimizer's state are read
when the step has ended: with them, a difference born anywhere in a step shows, and shows in
its phase, which is where `diff` then looks op by op. (Under ``torch.compile`` these are left
out: Adam divides a gradient by its own size, so where a gradient is only rounding
noise, as a key projection's bias is, the compiled side's reordered sums move that parameter
otherwise, 6e-4 relative on the reference model, with every gradient within the kernels'
tolerance.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from energydiag.engine.fingerprint import OpPrint
from energydiag.engine.instrument import BACKWARD, FORWARD, OPTIMIZER
from energydiag.engine.reductions import reduce64
from energydiag.engine.slots import Slots

Called = tuple[tuple[Any, ...], dict[str, Any], Any]  # a module call's args, kwargs, output


class ModulePrints:
    """Hooks on every module and parameter of ``model`` until ``detach``. With ``keep``, the
    calls of that module (args, kwargs and output, copied) are kept for a float64 re-run.
    ``compiled``: the hooks are traced into a graph, and reduce as plain tensor code."""

    def __init__(self, model: nn.Module, keep: str | None = None, compiled: bool = True) -> None:
        self.modules = [(name, type(m).__name__) for name, m in model.named_modules()]
        self.parameters = list(model.named_parameters())
        self.reducing = _Traced if compiled else _Eager
        self.reducer: _Traced | _Eager = self.reducing()
        self.calls: list[tuple[int, Any, Any]] = []  # module, its outputs', its inputs' handles
        self.grads: list[tuple[int, Any]] = []
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
        self.reducer = self.reducing()

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()

    def prints(self, loss: float, optimizer: torch.optim.Optimizer | None = None) -> list[OpPrint]:
        """The step's module outputs in the order they finished, its ``loss``, its gradients in
        the order they were accumulated, then (given the ``optimizer``) each parameter and its
        optimizer state as the step left them; read back at once."""
        left = _left(self.parameters, optimizer) if optimizer else []
        left_at = self.reducer.reduce([t for _, _, t in left])
        values = self.reducer.read()
        seen: Counter[str] = Counter()
        entries = []
        for i, outs, ins in self.calls:
            name, kind = self.modules[i]
            seen[name] += 1
            entry = OpPrint(len(entries), FORWARD, name, kind, seen[name])
            entry.outputs, entry.inputs = values(outs), values(ins)
            entry.parameters = [""] * len(entry.inputs)
            entries.append(entry)
        entries.append(OpPrint(len(entries), FORWARD, "", "loss", 1, [[abs(loss), loss]]))
        for i, grad in self.grads:
            name = self.parameters[i][0]
            seen[name] += 1
            entries.append(_gradient(len(entries), name, seen[name], values(grad)))
        for (op, name, _), reduced in zip(left, values(left_at), strict=True):
            owner = name.rpartition(".")[0]
            entries.append(OpPrint(len(entries), OPTIMIZER, owner, op, 1, [reduced]))
        return entries

    def _forward(self, index: int, keep: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            outs = _floats(out)
            if not outs:
                return
            reduce = self.reducer.reduce
            self.calls.append((index, reduce(outs), reduce(_floats(args))))
            if keep:
                self.kept.append((copied(args), copied(kwargs), copied(out)))

        return hook

    def _accumulated(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self.grads.append((index, self.reducer.reduce([param.grad])))

        return hook


class _Traced:
    """Reductions a compiled graph can hold: plain tensor code, no state read between calls (a
    reused buffer would be a global the graph writes). Each call's values are a [k, 2] tensor."""

    def reduce(self, tensors: list[torch.Tensor]) -> torch.Tensor | None:
        return _reduced(tensors)

    def read(self) -> Callable[[torch.Tensor | None], list[list[float]]]:
        return lambda handle: [] if handle is None else handle.tolist()


class _Eager:
    """Reductions into one store (``engine/slots.py``), read back once: a tensor seen again as
    it was, a module's input that an earlier module output or a parent's own input, keeps its
    slot, which on the benchmark step halves the elements reduced."""

    def __init__(self) -> None:
        self.slots = Slots()

    def reduce(self, tensors: list[torch.Tensor]) -> list[int]:
        return [self.slots.of(t) for t in tensors]

    def read(self) -> Callable[[list[int]], list[list[float]]]:
        table, _ = self.slots.reductions.read()
        return lambda handle: [table[i] for i in handle]


def _left(
    parameters: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer
) -> list[tuple[str, str, torch.Tensor]]:
    """Each parameter as the step left it, and its optimizer state (Adam's moments), with the
    entry's op and the parameter's name. A moment can differ while the parameter it moved does
    not yet (a change below the parameter's float32 resolution)."""
    return [
        (f"{what} {name}", name, t.detach())
        for name, p in parameters
        for what, t in [("parameter", p), *optimizer.state.get(p, {}).items()]
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]


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
