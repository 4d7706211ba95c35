"""Which side of a `diff` is right: the first diverging op (or module) re-run in float64 on
each side's own inputs. The side whose output is far from its own float64 truth is the less
accurate one; two sides each close to their truth but apart from each other differ in what
they compute, not in how precisely."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from energydiag.analyses.diff_variants import Variant, side_session
from energydiag.engine.fingerprint import Key, key_of
from energydiag.engine.instrument import FORWARD, Instrument, OpCall
from energydiag.engine.module_prints import copied
from energydiag.engine.tensorstats import float_tensors
from energydiag.io.rundir import Run

ErrorOf = Callable[[Run, int, torch.device, Variant, Key], float | None]
Called = tuple[Any, tuple[Any, Any, Any]]  # an op, and its args, kwargs and output as copied
Kept = dict[Key, Called]


def shadow(
    sides: list[tuple[Run, Variant]],
    step: int,
    device: torch.device,
    keys: tuple[Key, Key],
    kept: tuple[Kept, Kept] = ({}, {}),
    replay: bool = True,
) -> dict[str, float] | None:
    """Each side's output of the first divergence against its own float64 re-run; None when
    one side's cannot be re-run (an in-place op, a gradient, a module that draws random
    numbers or casts to another dtype itself). An op ``kept`` by the replay that named it is
    re-run from there; any other is captured by one more replay, unless not to ``replay``."""
    errors = []
    for (run, variant), key, calls in zip(sides, keys, kept, strict=True):
        if variant.watch == "gradient":
            return None  # a gradient reduced across ranks has no op of its own to re-run
        if key in calls:
            error = _rerun(calls[key])
        elif not replay:
            return None
        else:
            error_of: ErrorOf = _module_error if variant.watch == "module" else _op_error
            error = error_of(run, step, device, variant, key)
        if error is None:
            return None
        errors.append(error)
    return {"error_a": errors[0], "error_b": errors[1]}


class Capture:
    """The inputs and output of the ops ``wanted`` picks (by the call, and its key), copied as
    the ops are seen, for their float64 re-run; not of in-place ops, whose inputs are already
    overwritten then."""

    def __init__(self, wanted: Callable[[OpCall, Key], bool]) -> None:
        self.wanted, self.seen, self.calls = wanted, Counter(), {}

    def on_op(self, call: OpCall) -> None:
        where = key_of(call.phase, call.module, call.name, 0)[:3]
        self.seen[where] += 1
        key = (*where, self.seen[where])
        if not call.mutable and self.wanted(call, key):
            self.calls[key] = (
                call.func,
                tuple(copied(p) for p in (call.args, call.kwargs, call.out)),
            )


def _op_error(
    run: Run, step: int, device: torch.device, variant: Variant, key: Key
) -> float | None:
    session, _ = side_session(run, step, device, variant)
    capture = Capture(lambda _, seen: seen == key)
    with variant.applied(), Instrument([capture]).attached(session.optimizer, session.model):
        session.train(run.batch(step))
    return _rerun(capture.calls[key]) if key in capture.calls else None


def _rerun(called: Called) -> float:
    func, (args, kwargs, out) = called
    return _error(out, func(*tree_map(_wide, args), **tree_map(_wide, kwargs)))


def _module_error(
    run: Run, step: int, device: torch.device, variant: Variant, key: Key
) -> float | None:
    """The module's call, copied out of the step, re-run by a float64 copy of the module with
    the weights it read (the optimizer moves them at the end of the step)."""
    phase, name, op, occurrence = key
    if phase != FORWARD or op == "loss":
        return None  # a gradient, a parameter or the loss has no module of its own to re-run
    session, prints = side_session(run, step, device, variant, keep=name)
    module = session.model.get_submodule(name)
    if _draws_random(module):
        return None
    as_read = {k: v.detach().clone() for k, v in module.state_dict().items()}
    prints.reset()
    try:
        with variant.applied():
            session.train(run.batch(step))
    finally:
        prints.detach()
    if len(prints.kept) < occurrence:
        return None
    args, kwargs, out = prints.kept[occurrence - 1]
    try:
        with torch.no_grad():
            truth = _float64_copy(module, as_read).forward(
                *tree_map(_wide, args), **tree_map(_wide, kwargs)
            )
    except (RuntimeError, TypeError):
        return None  # the module casts to another dtype itself
    return _error(out, truth)


def _float64_copy(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy without the compiled call (its ``forward`` is called: no hooks, no dynamo)."""
    compiled = getattr(module, "_compiled_call_impl", None)
    wide = copy.deepcopy(module, {id(compiled): None} if compiled else {})
    wide.load_state_dict(state)
    return wide.double()


def _draws_random(module: nn.Module) -> bool:
    """Dropout in training: its float64 copy would draw another mask."""
    return any(
        m.training and float(getattr(m, "p", getattr(m, "dropout", 0.0)) or 0.0) > 0
        for m in module.modules()
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention))
    )


def _error(out: Any, truth: Any) -> float:
    """The largest relative error over the float outputs, against their float64 truth."""
    errors = [
        (
            torch.linalg.vector_norm(o.double() - t) / torch.linalg.vector_norm(t).clamp_min(1e-300)
        ).item()
        for o, t in zip(float_tensors(out), float_tensors(truth), strict=False)
    ]
    return max(errors, default=0.0)


def _wide(t: Any) -> Any:
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
