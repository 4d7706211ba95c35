"""Where two executions of one training step part ways, op by op, before anything is NaN.

Both sides replay the same step from a checkpoint over its recorded batch (or two runs over
their own), every op fingerprinted (``engine/fingerprint.py``). Ops pair up by phase, module, op
and occurrence; the first pair whose outputs differ is where the divergence was born when its
inputs agreed (or came in through a parameter that differs), inherited otherwise. That op is
then re-run in float64 on each side's own inputs, which says which side is closer to the truth.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from energydiag.engine.environment import deterministic_algorithms
from energydiag.engine.fingerprint import Fingerprints, Key, OpPrint, key_of
from energydiag.engine.instrument import Instrument, OpCall
from energydiag.engine.session import Session, open_session
from energydiag.engine.step import AUTOCAST_DTYPES
from energydiag.errors import DiagError, OptionError
from energydiag.io.rundir import Run
from energydiag.schema import Record, Report, report

DTYPES = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
TOLERANCE_EPS = 2.0  # across a dtype change: outputs within 2 eps of the coarser dtype agree


@dataclass
class Variant:
    """What side B changes: ``threads=K``, ``dtype=D`` (parameters, optimizer state and inputs
    cast), ``autocast=D`` (the forward under autocast, as a mixed-precision run has it) or
    ``deterministic=off`` (torch's default kernels against side A's deterministic ones)."""

    spec: str
    threads: int | None = None
    dtype: torch.dtype | None = None
    autocast: str | None = None
    deterministic: bool | None = None  # None: as the process has it

    def baseline(self) -> Variant:
        """Side A: the replay as it is; with deterministic kernels when B turns them off."""
        return Variant("", deterministic=True) if self.deterministic is False else Variant("")

    @property
    def tolerance(self) -> float:
        """Relative difference below which two fingerprints agree: 0 (bit for bit) within one
        dtype, ``TOLERANCE_EPS`` epsilons of the coarser one across a change."""
        changed = self.dtype or (AUTOCAST_DTYPES[self.autocast] if self.autocast else None)
        if changed is None or torch.finfo(changed).eps <= torch.finfo(torch.float32).eps:
            return 0.0
        return TOLERANCE_EPS * torch.finfo(changed).eps

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        kept = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with contextlib.ExitStack() as stack:
                if self.deterministic is not None:
                    stack.enter_context(deterministic_algorithms(self.deterministic))
                yield
        finally:
            torch.set_num_threads(kept)


def parse_variant(spec: str) -> Variant:
    name, _, value = spec.partition("=")
    if name == "threads" and value.isdigit() and int(value) > 0:
        return Variant(spec, threads=int(value))
    if name == "dtype" and value in DTYPES:
        return Variant(spec, dtype=DTYPES[value])
    if name == "autocast" and DTYPES.get(value) in (torch.bfloat16, torch.float16):
        return Variant(spec, autocast=str(DTYPES[value]).replace("torch.", ""))
    if name == "deterministic" and value == "off":
        return Variant(spec, deterministic=False)
    raise OptionError(
        "use threads=K, dtype=float64|float32|bfloat16|float16, autocast=bf16|fp16 or "
        "deterministic=off (compile, device and ranks are not built yet)",
        "against",
        value=repr(spec),
    )


@dataclass
class OpDifference(Record):
    phase: str
    module: str
    op: str
    occurrence: int
    a: list[list[float]]  # per output: [norm, sum]
    b: list[list[float]]
    relative: float
    inputs_matched: bool
    differing_inputs: list[str] = field(default_factory=list)  # "weight 'l1.weight'", "input 0"
    shadow: dict[str, Any] | None = None  # the float64 re-run of this op on each side's inputs


@report("diff")
@dataclass
class DiffReport(Report):
    a: str
    b: str
    step: int
    against: str | None
    tolerance: float
    replayed_from: list[int]  # each side's checkpoint: the steps before ``step`` replay first
    ops: list[int]  # fingerprinted ops on A and on B
    aligned: int
    unmatched: list[int]  # ops of A with no partner on B, and of B with none on A
    first_divergence: OpDifference | None
    modules: list[dict[str, Any]]  # per module, in execution order: its largest difference
    loss: list[float]
    parameters: dict[str, Any]  # after the step: the most different parameter
    verdict: str
    steps: list[int] = field(default_factory=list)  # compared: from this step to ``step``
    bitwise: bool = False  # every bit compared too, not only the norm and the sum


def diff_step(
    run_a: Run, run_b: Run | None, step: int, variant: Variant | None, device: torch.device
) -> DiffReport:
    """Side B is ``run_b``, or ``run_a`` under ``variant``."""
    return diff_steps(run_a, run_b, step, step, variant, device)


def diff_steps(
    run_a: Run,
    run_b: Run | None,
    first: int,
    last: int,
    variant: Variant | None,
    device: torch.device,
    bitwise: bool = False,
) -> DiffReport:
    """Steps ``first``..``last`` replayed side by side, each side going on from its own state;
    the report of the first step whose fingerprints differ at all (the last one's when none
    does): after it, every difference is inherited. ``bitwise``: every bit must agree too."""
    variant = variant or Variant("")
    if first > last:
        raise OptionError("use N..M with N <= M", "steps", value=f"{first}..{last}")
    if bitwise and variant.tolerance:
        raise OptionError(f"{variant.spec} changes every bit by design", "bitwise")
    sides = [(run_a, variant.baseline()), (run_b or run_a, variant)]
    for run, _ in sides:
        run.require_batches(first, last)
    played = zip(
        *(_fingerprinted(run, first, last, device, v, bitwise) for run, v in sides), strict=True
    )
    try:
        for step, (side_a, side_b) in enumerate(played, start=first):
            found = _report(sides, step, side_a, side_b, variant.tolerance, device)
            found.bitwise = bitwise
            if found.first_divergence is not None:
                break
    except RuntimeError as err:  # the model casts inside its own code: dtype= cannot hold
        if variant.dtype is None or "dtype" not in str(err):
            raise
        raise DiagError(
            run_a.manifest_path,
            f"{variant.spec}: the model casts to another dtype itself ({str(err).splitlines()[0]});"
            " compare under autocast=bf16 or fp16 instead",
        ) from None
    found.steps = [first, found.step]
    return found


Played = tuple[list[OpPrint], float, dict[str, torch.Tensor]]


def _report(
    sides: list[tuple[Run, Variant]],
    step: int,
    side_a: Played,
    side_b: Played,
    tol: float,
    device: torch.device,
) -> DiffReport:
    (prints_a, loss_a, params_a), (prints_b, loss_b, params_b) = side_a, side_b
    first, modules, aligned = _compare(prints_a, prints_b, tol)
    if first is not None:
        first.shadow = _shadow(sides, step, device, first)
    keys_a, keys_b = {p.key for p in prints_a}, {p.key for p in prints_b}
    (run_a, _), (run_b, variant) = sides
    return DiffReport(
        str(run_a.root),
        str(run_b.root),
        step,
        variant.spec or None,
        tol,
        [run.checkpoint_at_or_before(step) for run, _ in sides],
        [len(prints_a), len(prints_b)],
        aligned,
        [len(keys_a - keys_b), len(keys_b - keys_a)],
        first,
        modules,
        [loss_a, loss_b],
        _parameter_gap(params_a, params_b),
        _verdict(first),
    )


def _session(run: Run, step: int, device: torch.device, variant: Variant) -> Session:
    """A session at the start of ``step``: the checkpoint at or before it, then the steps
    between replayed as recorded (under the variant)."""
    session = open_session(run, step, device)
    if variant.dtype is not None:
        session.set_precision(variant.dtype)
    if variant.autocast is not None:
        session.autocast_dtype = variant.autocast
    with variant.applied():
        for earlier in range(session.step, step):
            session.train(run.batch(earlier))
    return session


def fingerprint_step(
    run: Run, step: int, device: torch.device, variant: Variant | None = None
) -> Played:
    """The step's per-op fingerprints, its loss, and the parameters after it."""
    return next(_fingerprinted(run, step, step, device, variant or Variant("")))


def _fingerprinted(
    run: Run, first: int, last: int, device: torch.device, variant: Variant, bitwise: bool = False
) -> Iterator[Played]:
    """Each step of ``first``..``last`` in turn, one session going on from step to step."""
    session = _session(run, first, device, variant)
    for step in range(first, last + 1):
        prints = Fingerprints(session.model, bitwise)
        with variant.applied(), Instrument([prints]).attached(session.optimizer):
            result = session.train(run.batch(step))
        params = {n: p.detach().double().cpu() for n, p in session.model.named_parameters()}
        yield prints.prints(), float(result.loss), params


def relative(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest relative difference between two ops' output fingerprints: of the norms, and
    of the sums against |sum| + norm (a sum near zero cancels; its norm does not)."""
    if len(a) != len(b):
        return float("inf")
    gaps = [0.0]
    for (norm_a, sum_a), (norm_b, sum_b) in zip(a, b, strict=True):
        scale = max(abs(norm_a), abs(norm_b), 1e-300)
        gaps += [abs(norm_a - norm_b) / scale, abs(sum_a - sum_b) / (scale + abs(sum_a))]
    return max(gaps)


def _compare(
    prints_a: list[OpPrint], prints_b: list[OpPrint], tol: float
) -> tuple[OpDifference | None, list[dict[str, Any]], int]:
    by_key = {p.key: p for p in prints_b}
    first, modules, aligned = None, {}, 0
    for pa in prints_a:
        pb = by_key.get(pa.key)
        if pb is None:
            continue
        aligned += 1
        gap = relative(pa.outputs, pb.outputs)
        worst = modules.setdefault(pa.module or "<outside modules>", {"largest": 0.0, "op": ""})
        if gap > worst["largest"]:
            worst.update(largest=gap, op=pa.op, phase=pa.phase)
        if first is None and (gap > tol or pa.bits != pb.bits):
            first = _difference(pa, pb, gap, tol)
    listed = [{"module": m, **v} for m, v in modules.items()]
    return first, listed, aligned


def _difference(pa: OpPrint, pb: OpPrint, gap: float, tol: float) -> OpDifference:
    """Which of the op's inputs differ between the sides: a weight, or an activation."""
    bitwise = bool(pa.input_bits)
    apart = [
        (i, name)
        for i, (x, y, name) in enumerate(zip(pa.inputs, pb.inputs, pa.parameters, strict=False))
        if relative([x], [y]) > tol or (bitwise and _unequal(pa, pb, i))
    ]
    differing = [f"weight {name!r}" if name else f"input {i}" for i, name in apart]
    return OpDifference(
        pa.phase,
        pa.module,
        pa.op,
        pa.occurrence,
        pa.outputs,
        pb.outputs,
        gap,
        all(name for _, name in apart),  # only weights differ, no activation
        differing,
    )


def _unequal(pa: OpPrint, pb: OpPrint, i: int) -> bool:
    return i >= len(pb.input_bits) or pa.input_bits[i] != pb.input_bits[i]


class _Capture:
    """The inputs and output of one keyed op, kept for its float64 re-run."""

    def __init__(self, key: Key) -> None:
        self.key, self.seen, self.call, self.func = key, {}, None, None

    def on_op(self, call: OpCall) -> None:
        where = key_of(call.phase, call.module, call.name, 0)[:3]
        self.seen[where] = self.seen.get(where, 0) + 1
        if (*where, self.seen[where]) == self.key and self.call is None:
            self.call = tuple(_tree(part, _kept) for part in (call.args, call.kwargs, call.out))
            self.func = call.func


def _shadow(
    sides: list[tuple[Run, Variant]], step: int, device: torch.device, first: OpDifference
) -> dict[str, Any] | None:
    """Each side's output of the first diverging op against that op in float64 on its inputs."""
    key = key_of(first.phase, first.module, first.op, first.occurrence)
    errors = []
    for run, variant in sides:
        session = _session(run, step, device, variant)
        capture = _Capture(key)
        with variant.applied(), Instrument([capture]).attached(session.optimizer):
            session.train(run.batch(step))
        if capture.call is None or capture.func._schema.is_mutable:
            return None  # an in-place op's inputs are already overwritten when it is seen
        errors.append(_error(capture.func, *capture.call))
    return {"error_a": errors[0], "error_b": errors[1]}


def _error(func: Any, args: Any, kwargs: Any, out: Any) -> float:
    """The op's largest relative error over its float outputs, against itself in float64."""
    truths = _floats(func(*_tree(args, _wide), **_tree(kwargs, _wide)))
    errors = [
        (
            torch.linalg.vector_norm(o.double() - t) / torch.linalg.vector_norm(t).clamp_min(1e-300)
        ).item()
        for o, t in zip(_floats(out), truths, strict=False)
    ]
    return max(errors, default=0.0)


def _kept(t: Any) -> Any:
    """A tensor copied out of the step (its storage may be reused or written later)."""
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def _wide(t: Any) -> Any:
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _tree(obj: Any, fn: Callable[[Any], Any]) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(fn, obj)


def _floats(obj: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _parameter_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    gaps = {
        name: float((a[name] - b[name]).abs().max() / a[name].abs().max().clamp_min(1e-300))
        for name in a
        if name in b and a[name].shape == b[name].shape
    }
    name = max(gaps, key=gaps.get, default=None)
    return {"most_different": name, "relative": gaps.get(name, 0.0) if name else 0.0}


def _verdict(first: OpDifference | None) -> str:
    if first is None:
        return "identical"
    if first.differing_inputs:  # the op computed alike; what it was given was not
        return f"the sides start apart: {', '.join(first.differing_inputs)} differ"
    shadow = first.shadow or {}
    a, b = shadow.get("error_a"), shadow.get("error_b")
    if a is None or b is None:
        return "differ (no float64 re-run)"
    if max(a, b) > 4 * min(a, b) and max(a, b) > 1e-6:  # one side far from float64
        return "B is less accurate" if b > a else "A is less accurate"
    if first.relative <= 4 * max(a, b, 1e-300):  # apart by no more than each one's rounding
        return "reduction-order noise"
    return "semantic difference"
