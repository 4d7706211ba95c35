"""One instrument for a training step: a dispatch mode that hands every aten op to observers.

Modelled on torch.utils.flop_counter: a single TorchDispatchMode, module attribution from
torch.utils.module_tracker.ModuleTracker (forward *and* backward), and small observers that each
look at the ops they care about. View ops are skipped by their own schema (``is_view``): their
values already existed in their input; so are allocations whose values are undefined.

Each op is labelled with the phase it ran in, which works for any step function:
forward (outside autograd, before the last backward), backward (inside the autograd engine),
clip (after the last backward, before optimizer.step: gradient processing), optimizer (inside
optimizer.step, seen through the optimizer's step hooks). "Last backward" is known only after
the step, so ops between a backward and the next forward are resolved at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.module_tracker import ModuleTracker

from energydiag.io.state import plain_key

FORWARD, BACKWARD, CLIP, OPTIMIZER = "forward", "backward", "clip", "optimizer"
PLAIN_TYPES = frozenset({torch.Tensor, nn.Parameter})  # what the instrument dispatches itself
AFTER_BACKWARD = "after-backward"  # resolved to clip or forward once the step is over


@dataclass
class OpCall:
    """One executed aten op, as observers see it."""

    func: Any
    args: tuple
    kwargs: dict
    out: Any
    order: int
    module: str
    phase: str
    micro_batch: int
    autograd_node: str | None = None
    # For ops that write into their inputs (x.add_(y), the optimizer's _foreach_addcdiv_): the
    # written inputs are already changed when observers look, so their state before is kept here.
    written_were_finite: bool | None = None
    mutable: bool = False  # the op writes into an argument

    @property
    def name(self) -> str:
        return self.func._schema.name

    @property
    def packet(self) -> Any:
        return self.func.overloadpacket


class Observer(Protocol):
    """Sees every op. One that judges an in-place op by what it wrote as it was before
    (``OpCall.written_were_finite``) says so with a class attribute ``reads_written_before =
    True``: the instrument checks those tensors (a reduction each) only for such observers. One
    with a ``before_write(func, args, kwargs, phase)`` method is called with an in-place op
    before it runs, while what it writes still holds its old values."""

    def on_op(self, call: OpCall) -> None: ...


class PhaseClock:
    """Which phase the step is in, from the autograd engine and the optimizer's step hooks.

    Micro-batches are counted without the step function's help: each finished backward pass
    ends one, so gradient accumulation over K micro-batches shows as micro-batches 1..K.
    """

    def __init__(self) -> None:
        self.in_optimizer = False
        self.in_backward = False
        self.backwards = 0

    @property
    def micro_batch(self) -> int:
        return self.backwards + 1

    def current(self) -> str:
        if torch._C._current_graph_task_id() != -1:
            self.in_backward = True
            return BACKWARD
        if self.in_backward:  # the first op after a backward pass: that micro-batch is done
            self.in_backward = False
            self.backwards += 1
        if self.in_optimizer:
            return OPTIMIZER
        return AFTER_BACKWARD if self.backwards else FORWARD

    @contextlib.contextmanager
    def watching(self, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        if optimizer is None:
            yield
            return
        pre = optimizer.register_step_pre_hook(lambda *_: setattr(self, "in_optimizer", True))
        post = optimizer.register_step_post_hook(lambda *_: setattr(self, "in_optimizer", False))
        try:
            yield
        finally:
            pre.remove()
            post.remove()


class Instrument(TorchDispatchMode):
    """Runs every op, then hands it to each observer with its module, phase and micro-batch."""

    def __init__(self, observers: list[Observer], clock: PhaseClock | None = None) -> None:
        super().__init__()
        self.observers = observers
        self.written_before = any(getattr(o, "reads_written_before", False) for o in observers)
        self.clock = clock or PhaseClock()
        self.tracker = ModuleTracker()
        self.calls: list[OpCall] = []  # only the ones an observer kept, for phase resolution
        self.order = 0
        self.before_write = [o.before_write for o in observers if hasattr(o, "before_write")]
        # per op overload: whether observers never see it, and whether it writes an argument
        self.kinds: dict[Any, tuple[bool, bool]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not PLAIN_TYPES.issuperset(types):
            # A tensor subclass (an FSDP DTensor) desugars first; its shards come back here.
            return NotImplemented
        kwargs = kwargs or {}
        kind = self.kinds.get(func)
        if kind is None:
            skip = func.is_view or _uninitialised(func) or not self.observers
            kind = self.kinds[func] = (skip, func._schema.is_mutable)
        skip, mutable = kind
        before = self._before(func, args, kwargs) if mutable and not skip else None
        out = func(*args, **kwargs)
        self.order += 1
        if skip:
            return out
        phase = self.clock.current()
        call = OpCall(
            func,
            args,
            kwargs,
            out,
            self.order,
            self.module(),
            phase,
            self.clock.micro_batch,
            _autograd_node(),
            before,
            mutable,
        )
        for observer in self.observers:
            observer.on_op(call)
        return out

    def _before(self, func: Any, args: tuple, kwargs: dict) -> bool | None:
        """An in-place op about to run: whether what it writes is finite (when an observer
        asks), and the observers that look at it first."""
        if self.before_write:
            phase = self.clock.current()
            for look in self.before_write:
                look(func, args, kwargs, phase)
        return _written_finite(func, args, kwargs) if self.written_before else None

    def module(self) -> str:
        """The innermost running module as a state-dict path ('' root becomes '<model>')."""
        running = [p for p in self.tracker.parents if p != "Global"]
        if not running:
            return ""
        _, _, path = max(running, key=lambda p: p.count(".")).partition(".")
        return plain_key(path) if path else "<model>"  # DDP's 'module.' is not the user's name

    @contextlib.contextmanager
    def attached(
        self, optimizer: torch.optim.Optimizer | None = None, model: nn.Module | None = None
    ) -> Iterator[Instrument]:
        """``model``: the root the module paths are relative to, named before anything runs.
        ModuleTracker names a module from the first one it sees called, so a step that calls a
        submodule without calling the root (a LightningModule's ``training_step`` calling
        ``self.net``) would name ``net.norm`` as ``norm``."""
        if model is not None:
            self.tracker._get_mod_name(model)  # names the whole tree from the root down
        with self.tracker, self.clock.watching(optimizer), self:
            yield self


def _written_finite(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the float tensors an in-place op is about to write are finite now."""
    from energydiag.engine.tensorstats import all_finite, float_tensors

    return all_finite(float_tensors(written(func, args, kwargs)))


def written(func: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The arguments an op writes into (``x`` of ``x.add_(y)``, every list of ``_foreach_add_``,
    an ``out=``), by its schema."""
    schema = func._schema.arguments
    return [
        (args[i] if i < len(args) else kwargs.get(a.name))
        for i, a in enumerate(schema)
        if a.alias_info is not None and a.alias_info.is_write
    ]


def _uninitialised(func: Any) -> bool:
    """Outputs whose values are undefined when the op returns: allocations (aten::empty*,
    new_empty*, resize_), whose memory may hold any bit pattern, NaN included, until something
    writes it; and collectives (c10d::*), whose output buffers fill when their work completes,
    possibly after the op has returned (FSDP's all-gather)."""
    name = func._schema.name
    return "empty" in name or name == "aten::resize_" or name.startswith("c10d::")


def _autograd_node() -> str | None:
    """The backward function running now ('SqrtBackward0'), None in forward."""
    node = torch._C._current_autograd_node()
    return None if node is None else type(node).__name__


def resolve_phase(phase: str, micro_batch: int, backwards: int) -> str:
    """An op after a backward is gradient processing (clip) unless another backward pass
    followed it (``backwards`` counts them all), in which case it was that micro-batch's forward."""
    if phase != AFTER_BACKWARD:
        return phase
    return FORWARD if micro_batch <= backwards else CLIP
