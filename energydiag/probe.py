"""Instrumentation for one forward/backward: module hooks plus an op-level dispatch mode.

Used for the deep re-run of a failing step and for periodic statistics; never on the fast path.

* ``ModuleRecorder`` (forward hooks) sees every module's inputs and outputs, in the order the
  modules finish, so the first module whose output is non-finite while its inputs were finite is
  the innermost place a fault appeared.
* ``OpRecorder`` (a TorchDispatchMode) sees every aten op, functional calls included. It notes
  where NaN first appears from NaN-free inputs and where Inf first appears from finite inputs;
  an intentional -inf (an attention mask fill) is recorded but only blamed when the module it
  lives in emits a non-finite output. It also counts saturated sigmoid/tanh/softplus outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SATURATION_EPS = 1e-3


@dataclass
class TensorSummary:
    """Counts and finite-only range of a tensor: enough to explain an op without storing it."""

    shape: list[int]
    nan: int
    posinf: int
    neginf: int
    min: float
    max: float
    mean: float = 0.0
    std: float = 0.0

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.posinf == 0 and self.neginf == 0

    def describe(self) -> str:
        bad = [
            f"{n} {k}"
            for k, n in (("NaN", self.nan), ("+Inf", self.posinf), ("-Inf", self.neginf))
            if n
        ]
        rng = f"[{self.min:.4g}, {self.max:.4g}]" if self.min <= self.max else "[no finite values]"
        return f"{self.shape} finite range {rng}" + (f", {', '.join(bad)}" if bad else "")


def as_float(t: torch.Tensor) -> torch.Tensor:
    """float32/float64 as they are; half precision upcast so sums and counts stay exact."""
    x = t.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def summarize(t: torch.Tensor) -> TensorSummary:
    """Counts of NaN/±Inf and the range, mean and std of the finite values.

    A one-pass sum decides whether anything non-finite needs counting and masking at all.
    """
    x = as_float(t)
    big = torch.finfo(x.dtype).max
    counts = (0, 0, 0)
    if x.numel() and not math.isfinite(float(x.sum())):
        counts = tuple(
            torch.stack([x.isnan().sum(), (x == math.inf).sum(), (x == -math.inf).sum()]).tolist()
        )
        x = x[torch.isfinite(x)] if any(counts) else x
    if not x.numel():
        return TensorSummary(list(t.shape), *counts, big, -big)
    lo, hi = torch.aminmax(x)
    std, mean = torch.std_mean(x) if x.numel() > 1 else (x.new_zeros(()), x.mean())
    lo, hi, mean, std = torch.stack([lo, hi, mean, std]).double().tolist()
    return TensorSummary(list(t.shape), *counts, lo, hi, mean, std)


def float_tensors(obj: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Screen with one sum per tensor: any NaN or Inf makes the total non-finite. A finite total
    proves finiteness; a non-finite one may be a finite overflow, so it gets the exact check."""
    if not tensors:
        return True
    total = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors]).sum()
    if math.isfinite(total.item()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@dataclass
class ModuleEvent:
    path: str
    kind: str
    order: int
    inputs_finite: bool
    output_finite: bool
    output: TensorSummary | None


@dataclass
class OpEvent:
    """An aten op whose output gained NaN (from NaN-free inputs) or Inf (from finite inputs)."""

    order: int
    op: str
    module: str
    autograd_node: str | None
    gained: str
    inputs: list[TensorSummary]
    output: TensorSummary
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def phase(self) -> str:
        return "forward" if self.autograd_node is None else "backward"


@dataclass
class Saturation:
    module: str
    op: str
    total: int = 0
    saturated: int = 0

    @property
    def fraction(self) -> float:
        return self.saturated / self.total if self.total else 0.0


class ModuleRecorder:
    """Forward hooks on every submodule: a module stack for the op recorder, and per-module facts.

    ``detail`` sets the cost: "stack" only tracks which module is running; "flags" adds whether
    each module's inputs and output were finite (enough to localise); "summaries" adds full output
    statistics (what inspect shows).
    """

    def __init__(
        self, model: nn.Module, detail: str = "summaries", grad_outputs: bool = False
    ) -> None:
        if detail not in ("stack", "flags", "summaries"):
            raise ValueError(f"unknown detail level {detail!r}")
        self.model, self.detail, self.grad_outputs = model, detail, grad_outputs
        self.stack: list[str] = []
        self.events: list[ModuleEvent] = []
        self.output_grad_sq: dict[str, torch.Tensor] = {}
        self._inputs_finite: list[bool] = []

    @contextmanager
    def attached(self) -> Iterator[ModuleRecorder]:
        handles = []
        for path, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._pre(path or "<model>")))
            handles.append(
                module.register_forward_hook(self._post(path or "<model>", type(module).__name__))
            )
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    def _pre(self, path: str):
        def hook(_module, args):
            self.stack.append(path)
            if self.detail != "stack":
                self._inputs_finite.append(all_finite(float_tensors(args)))

        return hook

    def _post(self, path: str, kind: str):
        def hook(_module, _args, output):
            self.stack.pop()
            if self.detail == "stack":
                return
            outs = float_tensors(output)
            summary = summarize(outs[0]) if (self.detail == "summaries" and outs) else None
            finite = summary.finite if summary else all_finite(outs[:1])
            inputs_finite = self._inputs_finite.pop()
            self.events.append(
                ModuleEvent(path, kind, len(self.events), inputs_finite, finite, summary)
            )
            if self.grad_outputs and outs and outs[0].requires_grad:
                outs[0].register_hook(self._grad_hook(path))

        return hook

    def _grad_hook(self, path: str):
        def hook(grad: torch.Tensor) -> None:
            sq = grad.detach().float().pow(2).sum()
            self.output_grad_sq[path] = self.output_grad_sq.get(path, 0.0) + sq

        return hook

    def first_faulty(self) -> ModuleEvent | None:
        """The first module to finish with a non-finite output while its inputs were finite."""
        return next((e for e in self.events if e.inputs_finite and not e.output_finite), None)


class OpRecorder(TorchDispatchMode):
    """Every aten op: saturation counts always, non-finite origins when ``check_finite``."""

    def __init__(self, modules: ModuleRecorder, check_finite: bool = True) -> None:
        super().__init__()
        self.modules, self.check_finite = modules, check_finite
        self.order = 0
        self.events: list[OpEvent] = []
        self.saturation: dict[tuple[str, str], Saturation] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.order += 1
        if func.overloadpacket in _CANNOT_CREATE_NONFINITE:
            return out
        name = func._schema.name
        node = torch._C._current_autograd_node()
        if node is None and name in _SATURATING:
            self._count_saturation(name, args, kwargs, float_tensors(out))
        if self.check_finite:
            outs = [out] if isinstance(out, torch.Tensor) else float_tensors(out)
            if outs and outs[0].is_floating_point() and not all_finite(outs):
                self._note_origin(name, node, args, kwargs, outs)
        return out

    def _note_origin(self, name, node, args, kwargs, outs) -> None:
        out_sum = summarize(outs[0])
        in_sums = [summarize(t) for t in float_tensors((args, kwargs))]
        if out_sum.nan and not any(s.nan for s in in_sums):
            gained = "NaN"
        elif (out_sum.posinf or out_sum.neginf) and all(s.finite for s in in_sums):
            gained = "Inf"
        else:
            return
        node_name = None if node is None else type(node).__name__
        detail = _DETAILS[name](args, kwargs) if name in _DETAILS else {}
        event = OpEvent(
            self.order, name, self.modules.current, node_name, gained, in_sums, out_sum, detail
        )
        self.events.append(event)

    def _count_saturation(self, name, args, kwargs, outs) -> None:
        if not outs:
            return
        key = (self.modules.current, name)
        entry = self.saturation.setdefault(key, Saturation(*key))
        y = outs[0].detach()
        entry.total += y.numel()
        entry.saturated += int(_SATURATING[name](y, args, kwargs).sum())

    def origin(self, module: str | None = None, phase: str = "forward") -> OpEvent | None:
        """Where the first non-finite value came from.

        Forward: the first op that introduced NaN inside ``module``, else its first Inf (an
        intentional -inf mask fill precedes the softmax that turns it into NaN). Backward: the
        first event in order, since a gradient Inf (sqrt'(0)) is the cause of the NaN after it.
        """
        pool = [e for e in self.events if e.phase == phase and _within(e.module, module)]
        if phase == "forward":
            return next((e for e in pool if e.gained == "NaN"), None) or (pool[0] if pool else None)
        return pool[0] if pool else None


_aten = torch.ops.aten
# Views, copies and moves return values that were already in their inputs: a non-finite value in
# their output cannot originate there, so the recorder does not pay to check them.
_CANNOT_CREATE_NONFINITE = {
    _aten.view,
    _aten._unsafe_view,
    _aten.reshape,
    _aten.expand,
    _aten.permute,
    _aten.transpose,
    _aten.t,
    _aten.unsqueeze,
    _aten.squeeze,
    _aten.slice,
    _aten.select,
    _aten.detach,
    _aten.alias,
    _aten.clone,
    _aten.copy_,
    _aten.as_strided,
    _aten.split,
    _aten.split_with_sizes,
    _aten.chunk,
    _aten.unbind,
    _aten.cat,
    _aten.stack,
    _aten.index_select,
    _aten.gather,
    _aten.contiguous,
    _aten._to_copy,
    _aten.empty_like,
    _aten.zeros_like,
    _aten.ones_like,
    _aten.new_empty,
    _aten.new_zeros,
    _aten.empty,
    _aten.zeros,
    _aten.full,
    _aten.diagonal,
    _aten.unfold,
}


def _within(path: str, prefix: str | None) -> bool:
    if prefix is None or prefix == "<model>":
        return True
    return path == prefix or path.startswith(prefix + ".")


def _softplus_saturated(y, args, kwargs):
    """softplus'(x) = sigmoid(beta·x): below 1e-3 the gradient has all but vanished."""
    x = args[0].detach()
    beta = args[1] if len(args) > 1 else kwargs.get("beta", 1.0)
    return torch.sigmoid(beta * x) < SATURATION_EPS


def _masked_rows(args, kwargs):
    """Rows of a softmax input that are -inf everywhere: every key masked."""
    x, dim = args[0].detach(), args[1]
    return {
        "rows_all_neg_inf": int((x == -torch.inf).all(dim=dim).sum()),
        "rows": x.numel() // x.shape[dim],
    }


def _count(pred):
    return lambda args, kwargs: {"offending_inputs": int(pred(args).sum())}


_DETAILS = {
    "aten::_softmax": _masked_rows,
    "aten::_log_softmax": _masked_rows,
    "aten::log": _count(lambda a: a[0] <= 0),
    "aten::sqrt": _count(lambda a: a[0] < 0),
    "aten::rsqrt": _count(lambda a: a[0] <= 0),
    "aten::div": _count(lambda a: torch.as_tensor(a[1]) == 0),
    "aten::exp": _count(lambda a: a[0] > torch.log(torch.tensor(torch.finfo(a[0].dtype).max))),
}


_SATURATING = {
    "aten::sigmoid": lambda y, a, k: (y < SATURATION_EPS) | (y > 1 - SATURATION_EPS),
    "aten::tanh": lambda y, a, k: y.abs() > 1 - SATURATION_EPS,
    "aten::softplus": _softplus_saturated,
}


@dataclass
class Probe:
    """Module hooks and the op recorder, attached together for one instrumented pass."""

    model: nn.Module
    modules: ModuleRecorder = field(init=False)
    ops: OpRecorder = field(init=False)

    detail: str = "summaries"
    grad_outputs: bool = False
    check_finite: bool = True

    def __post_init__(self) -> None:
        self.modules = ModuleRecorder(self.model, self.detail, self.grad_outputs)
        self.ops = OpRecorder(self.modules, self.check_finite)

    @contextmanager
    def attached(self) -> Iterator[Probe]:
        with ExitStack() as stack:
            stack.enter_context(self.modules.attached())
            stack.enter_context(self.ops)
            yield self

    def saturation(self) -> list[Saturation]:
        return list(self.ops.saturation.values())
