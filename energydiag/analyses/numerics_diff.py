"""Where two executions of one training step part ways, op by op, before anything is NaN.

Both sides replay the same steps from a checkpoint over the recorded batches (or two runs over
their own), watched by hooks at every module output, the loss, every gradient and every
parameter the step leaves (``engine/module_prints.py``): cheap enough for every step of a range.
The first step where the sides part is replayed once more on each side with every op of the
phase where they parted fingerprinted (``engine/fingerprint.py``). Ops pair up by phase, module,
op and occurrence; the first pair whose outputs differ is where the divergence was born when its
inputs agreed (or came in through a parameter that differs), inherited otherwise. That op is
then re-run in float64 on each side's own inputs, which says which side is closer to the truth.
Under ``torch.compile`` the watch is all there is (a dispatch mode would make the compiled model
run eager), and a module is what is re-run in float64; across ranks, whose forwards see shards,
the gradients the step leaves are compared (``analyses/diff_ranks.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from energydiag.analyses.diff_alignment import align, close_for
from energydiag.analyses.diff_compare import (
    OpDifference,
    compare,
    differ,
    gradient_gap,
    parameter_gap,
)
from energydiag.analyses.diff_ranks import played_on_ranks
from energydiag.analyses.diff_shadow import Capture, Kept, shadow
from energydiag.analyses.diff_variants import Variant, side_session
from energydiag.engine.fingerprint import Fingerprints, OpPrint, Played
from energydiag.engine.instrument import (
    AFTER_BACKWARD,
    BACKWARD,
    FORWARD,
    OPTIMIZER,
    Instrument,
)
from energydiag.engine.module_prints import ModulePrints, gradients_left, gradients_of
from energydiag.engine.session import Session
from energydiag.engine.step import StepResult
from energydiag.errors import DiagError, OptionError
from energydiag.io.rundir import Batch, Run
from energydiag.schema import Report, report

AGREE = ("identical", "within tolerance", "reduction-order noise")  # the verdicts that pass


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
    aligned: int  # pairs, by key and by statistics
    unmatched: list[int]  # ops of A with no partner on B, and of B with none on A
    first_divergence: OpDifference | None
    modules: list[dict[str, Any]]  # per module, in execution order: its largest difference
    loss: list[float]
    parameters: dict[str, Any]  # after the step: the most different parameter
    verdict: str
    steps: list[int] = field(default_factory=list)  # compared: from this step to ``step``
    bitwise: bool = False  # every bit compared too, not only the norm and the sum
    # "module": module outputs and gradients (under torch.compile); "gradient": the gradients
    # the step leaves (ranks=W, whose forwards see shards)
    level: str = "op"
    noise_bound: float | None = None  # what judged a difference no float64 re-run could
    by_statistics: int = 0  # of ``aligned``: pairs of one value computed by other ops
    unmatched_stretches: list[dict[str, Any]] = field(default_factory=list)  # side, where, ops
    # ranks: |g_A - g_B| / |g_A| over every gradient at once, which a gradient that cancels
    # to near zero (a bias's) cannot inflate the way its own relative difference can
    gradient_gap: float | None = None
    # When an op is named: the entries the watch compared on A and on B (module outputs, the
    # loss, gradients, parameters), and the phase it saw the sides part in, whose ops were then
    # fingerprinted (``ops``)
    watched: list[int] = field(default_factory=list)
    named_in: str | None = None


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
    the report of the first step whose sides differ at all (the last one's when none does):
    after it, every difference is inherited. Each step is watched at module outputs, the loss,
    gradients and the parameters it leaves; the step where the sides part is replayed once more,
    op by op in the phase where they parted, which names the op. ``bitwise`` (every bit must
    agree too) fingerprints every op of every step."""
    variant = variant or Variant("")
    _refuse(variant, first, last, bitwise)
    sides = [(run_a, variant.baseline()), (run_b or run_a, variant)]
    for run, _ in sides:
        run.require_batches(first, last)
    by_module = variant.watch == "op" and not bitwise  # else watched as compared, throughout
    watch = (
        [(run, replace(v, watch="module", eager_watch=True)) for run, v in sides]
        if by_module
        else sides
    )
    with _own_casts_refused(run_a, variant):
        found = _first_apart(watch, first, last, device, bitwise)
        if found.first_divergence is not None:
            found = (
                _named(sides, watch, found, device) if by_module else _judged(found, watch, device)
            )
    found.steps = [first, found.step]
    return found


def _refuse(variant: Variant, first: int, last: int, bitwise: bool) -> None:
    if first > last:
        raise OptionError("use N..M with N <= M", "steps", value=f"{first}..{last}")
    if bitwise and variant.tolerance:
        raise OptionError(
            f"{variant.spec} is compared within a tolerance, not bit for bit", "bitwise"
        )
    if bitwise and variant.ranks:
        raise OptionError(f"{variant.spec} compares gradients by norm and sum only", "bitwise")
    if variant.ranks and first != last:
        raise OptionError(f"{variant.spec} compares one step, not a range", "steps")


@contextlib.contextmanager
def _own_casts_refused(run: Run, variant: Variant) -> Iterator[None]:
    """The model casts inside its own code: ``dtype=`` cannot hold, autocast can."""
    try:
        yield
    except RuntimeError as err:
        if variant.dtype is None or "dtype" not in str(err):
            raise
        raise DiagError(
            run.manifest_path,
            f"{variant.spec}: the model casts to another dtype itself ({str(err).splitlines()[0]});"
            " compare under autocast=bf16 or fp16 instead",
        ) from None


def _first_apart(
    sides: list[tuple[Run, Variant]], first: int, last: int, device: torch.device, bitwise: bool
) -> DiffReport:
    played = zip(
        *(_fingerprinted(run, first, last, device, v, bitwise) for run, v in sides), strict=True
    )
    for step, (side_a, side_b) in enumerate(played, start=first):
        found = _report(sides, step, side_a, side_b, bitwise)
        if found.first_divergence is not None:
            break
    return found


# Where the watch saw the sides part -> the phases then fingerprinted op by op. Ops after a
# backward pass are a later micro-batch's forward or the clip: which one is known only once the
# step is over, so they are fingerprinted with either.
NAMED_IN = {
    FORWARD: frozenset({FORWARD, AFTER_BACKWARD}),
    BACKWARD: frozenset({BACKWARD}),
    OPTIMIZER: frozenset({AFTER_BACKWARD, OPTIMIZER}),
}


def _named(
    sides: list[tuple[Run, Variant]],
    watch: list[tuple[Run, Variant]],
    watched: DiffReport,
    device: torch.device,
) -> DiffReport:
    """The step the watch saw part replayed once more on each side, its ops fingerprinted in
    that phase only: the first op apart there is the one named (and re-run in float64). The
    per-module differences stay the watch's, which saw the whole step."""
    where, step = watched.first_divergence.phase, watched.step
    kept = _where_born(watched.first_divergence)
    side_a, side_b = (
        next(_fingerprinted(run, step, step, device, v, phases=NAMED_IN[where], keep=kept))
        for run, v in sides
    )
    named = _report(sides, step, side_a, side_b, False)
    if named.first_divergence is None:  # the second replay did not part where the first did
        return _judged(watched, watch, device)
    named.modules, named.watched, named.named_in = watched.modules, watched.ops, where
    return _judged(named, sides, device, (side_a.kept, side_b.kept))


def _where_born(first: OpDifference) -> tuple[str, str] | None:
    """Where the op that was born apart probably ran, as the instrument names a phase and a
    module (the root's ``<model>``, and the loss's ``""``, outside every module), so that its
    ops are copied for the float64 re-run as they run. In the forward: a module whose inputs
    matched while its output did not, after every module inside it agreed (the op is one of its
    own). In the backward: the module whose gradient the watch first saw apart (its backward
    computes its weights' gradients and its input's). None elsewhere; an op born elsewhere is
    captured by one more replay."""
    if first.phase == BACKWARD:
        return BACKWARD, first.module or "<model>"
    if first.phase != FORWARD or not first.inputs_matched:
        return None
    return FORWARD, "<model>" if first.module == "" and first.op != "loss" else first.module


def _judged(
    found: DiffReport,
    sides: list[tuple[Run, Variant]],
    device: torch.device,
    kept: tuple[Kept, Kept] = ({}, {}),
) -> DiffReport:
    """The first divergence re-run in float64 on each side's inputs (as ``kept`` by the replay
    that named it, else captured by another), and the verdict it gives. Given inputs that
    differ, which side computed more precisely cannot change the verdict (the sides started
    apart), so no replay is spent on it; what was kept is still re-run."""
    first = found.first_divergence
    replay = not first.differing_inputs
    first.shadow = shadow(sides, found.step, device, first.keys(), kept, replay)
    found.verdict = _verdict(found)
    return found


def _report(
    sides: list[tuple[Run, Variant]], step: int, side_a: Played, side_b: Played, bitwise: bool
) -> DiffReport:
    (run_a, _), (run_b, variant) = sides
    tol = variant.tolerance
    aligned = align(side_a.prints, side_b.prints, close_for(tol))
    outside = "<outside modules>" if variant.watch == "op" else "<model>"
    first, modules = compare(aligned.pairs, tol, outside)
    if first is not None:
        first.step = step
    found = DiffReport(
        str(run_a.root),
        str(run_b.root),
        step,
        variant.spec or None,
        tol,
        [run.checkpoint_at_or_before(step) for run, _ in sides],
        [len(side_a.prints), len(side_b.prints)],
        len(aligned.pairs),
        [len(aligned.unpaired_a), len(aligned.unpaired_b)],
        first,
        modules,
        [side_a.loss, side_b.loss],
        parameter_gap(side_a.params, side_b.params),
        "",
        bitwise=bitwise,
        level=variant.watch,
        noise_bound=variant.noise_bound,
        gradient_gap=gradient_gap(side_a.grads, side_b.grads),
        by_statistics=aligned.by_statistics,
        unmatched_stretches=aligned.stretches(),
    )
    found.verdict = _verdict(found)
    return found


def fingerprint_step(
    run: Run, step: int, device: torch.device, variant: Variant | None = None
) -> Played:
    """The step's per-op fingerprints, its loss, and the parameters after it."""
    return next(fingerprint_steps(run, step, step, device, variant))


def fingerprint_steps(
    run: Run, first: int, last: int, device: torch.device, variant: Variant | None = None
) -> Iterator[Played]:
    """Steps ``first``..``last`` fingerprinted op by op in turn, one session going on."""
    return _fingerprinted(run, first, last, device, variant or Variant(""))


def _fingerprinted(
    run: Run,
    first: int,
    last: int,
    device: torch.device,
    variant: Variant,
    bitwise: bool = False,
    phases: frozenset[str] | None = None,
    keep: tuple[str, str] | None = None,
) -> Iterator[Played]:
    """Each step of ``first``..``last`` in turn, one session going on from step to step; op by
    op, only the ops of ``phases`` (every op when None), and with ``keep`` the ops of that phase
    and module (its own, not its children's) copied for a float64 re-run."""
    if variant.ranks:
        yield played_on_ranks(run, first, variant.ranks)
        return
    session, modules = side_session(run, first, device, variant)
    try:
        for step in range(first, last + 1):
            watcher = modules or Fingerprints(session.model, bitwise, phases)
            capture = (
                None if keep is None else Capture(lambda call, _: (call.phase, call.module) == keep)
            )
            with variant.applied():
                result, prints = _played(session, run.batch(step), variant, watcher, capture)
            model = session.model
            params = {n: p.detach().double().cpu() for n, p in model.named_parameters()}
            grads = gradients_of(model) if variant.watch == "gradient" else None
            yield Played(
                prints, float(result.loss), params, grads, capture.calls if capture else {}
            )
    finally:
        if modules is not None:
            modules.detach()


def _played(
    session: Session,
    batch: Batch,
    variant: Variant,
    watcher: ModulePrints | Fingerprints,
    capture: Capture | None,
) -> tuple[StepResult, list[OpPrint]]:
    """One step watched op by op (the ops ``capture`` wants copied as well), by the hooks at
    module outputs and gradients, or by the gradients it leaves."""
    if variant.watch == "gradient":
        return session.train(batch), gradients_left(session.model)
    if isinstance(watcher, ModulePrints):
        watcher.reset()
        result = session.train(batch)
        optimizer = session.optimizer if variant.eager_watch else None
        return result, watcher.prints(float(result.loss), optimizer)
    observers = [watcher] if capture is None else [watcher, capture]
    with Instrument(observers).attached(session.optimizer, session.model):
        result = session.train(batch)
    return result, watcher.prints()


def _verdict(found: DiffReport) -> str:
    first, unpaired = found.first_divergence, sum(found.unmatched)
    if found.level != "op" and unpaired:  # both sides run the same modules
        return f"incomplete: {unpaired} module outputs or gradients unpaired"
    if first is None:
        return "within tolerance" if any(m["largest"] for m in found.modules) else "identical"
    if found.gradient_gap is not None:  # no op to re-run: the gradients as a whole judge
        noise = found.gradient_gap <= found.noise_bound
        return "reduction-order noise" if noise else "semantic difference"
    if first.differing_inputs:  # the op computed alike; what it was given was not
        return f"the sides start apart: {differ(first.differing_inputs)}"
    shadow = first.shadow or {}
    a, b = shadow.get("error_a"), shadow.get("error_b")
    if a is None or b is None:
        return "differ (no float64 re-run)"
    if max(a, b) > 4 * min(a, b) and max(a, b) > 1e-6:  # one side far from float64
        return "B is less accurate" if b > a else "A is less accurate"
    if first.relative <= 4 * max(a, b, 1e-300):  # apart by no more than each one's rounding
        return "reduction-order noise"
    return "semantic difference"
