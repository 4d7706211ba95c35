"""A step's (or a few steps') per-op fingerprints kept as a CI baseline, and the first op a later
commit changed.

The gate replays the stored steps with every op fingerprinted, one session going on from step
to step, and compares each op with the stored one (paired by phase, module, op and occurrence):
a kernel, dtype or code change that moves any op's output beyond ``tolerance`` (0 by default:
bit for bit, since one machine replays deterministically) fails the gate with that op and its
step. The file is written or replaced only when asked (``update``); the gate never does on its
own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from energydiag.analyses.diff_alignment import Pair, align, close_for, relative
from energydiag.analyses.gate import FAIL, PASS, CheckResult
from energydiag.analyses.numerics_diff import fingerprint_steps
from energydiag.engine.fingerprint import OpPrint
from energydiag.engine.reductions import METHOD
from energydiag.errors import DiagError, OptionError
from energydiag.io.atomic import write_text_atomic
from energydiag.io.rundir import Run
from energydiag.schema import Record, Report, SchemaError, report


@dataclass
class StoredOp(Record):
    phase: str
    module: str
    op: str
    occurrence: int
    outputs: list[list[float]]
    numels: list[int]

    def fingerprint(self, index: int) -> OpPrint:
        return OpPrint(
            index,
            self.phase,
            self.module,
            self.op,
            self.occurrence,
            self.outputs,
            numels=self.numels,
        )


@dataclass
class StoredStep(Record):
    step: int
    ops: list[StoredOp]


@report("numerics-baseline")
@dataclass
class NumericsBaseline(Report):
    step: int
    torch: str
    tolerance: float = 0.0  # relative difference an op may move by; edit the file to loosen
    ops: list[StoredOp] = field(default_factory=list)
    method: int = 1  # how the fingerprints were reduced (engine/fingerprint.METHOD); 1 if absent
    later: list[StoredStep] = field(default_factory=list)  # the steps after ``step``, if any

    def stored(self) -> list[StoredStep]:
        return [StoredStep(self.step, self.ops), *self.later]


def baseline_steps(run: Run, span: tuple[int, int] | None = None) -> tuple[int, int]:
    """``span`` when the run can replay it (a checkpoint at or before its first step, and every
    batch from there); by default the first checkpoint that has its batch, a step every later
    recording of the run has."""
    if span is not None:
        first, last = span
        if first > last:
            raise OptionError("use N..M with N <= M", "numerics_step", value=f"{first}..{last}")
        run.require_batches(run.checkpoint_at_or_before(first), last)
        return span
    steps = run.checkpoints_with_batches
    if not steps:
        raise DiagError(run.root, "no checkpoint has its batch logged: no step to fingerprint")
    return steps[0], steps[0]


def capture(
    run: Run, device: torch.device, span: tuple[int, int] | None = None
) -> NumericsBaseline:
    """Each step of ``span`` fingerprinted in turn, one session going on from the checkpoint."""
    first, last = baseline_steps(run, span)
    played = enumerate(fingerprint_steps(run, first, last, device), start=first)
    head, *later = [StoredStep(step, _stored(prints)) for step, (prints, *_) in played]
    return NumericsBaseline(head.step, torch.__version__, 0.0, head.ops, METHOD, later)


def _stored(prints: list[OpPrint]) -> list[StoredOp]:
    return [StoredOp(p.phase, p.module, p.op, p.occurrence, p.outputs, p.numels) for p in prints]


def write_baseline(path: Path, baseline: NumericsBaseline) -> None:
    write_text_atomic(path, json.dumps(baseline.to_json()) + "\n")


def read_baseline(path: Path) -> NumericsBaseline:
    if not path.is_file():
        raise OptionError("no numerics baseline here: write one", "update_baseline", path=path)
    try:
        baseline = NumericsBaseline.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, SchemaError, TypeError, KeyError) as err:
        raise DiagError(path, f"not a numerics baseline ({str(err).splitlines()[0]})") from None
    steps = [s.step for s in baseline.stored()]
    if steps != list(range(steps[0], steps[0] + len(steps))):
        raise DiagError(path, f"not a numerics baseline (steps {steps} are not consecutive)")
    if baseline.method != METHOD:  # every op would move by float64 rounding, none by the code
        problem = (
            f"fingerprinted by method {baseline.method}, and this energydiag reduces by method "
            f"{METHOD}, which rounds differently in float64: write the baseline again"
        )
        raise OptionError(problem, "update_baseline", path=path)
    return baseline


def compare(baseline: NumericsBaseline, run: Run, device: torch.device) -> dict[str, Any]:
    """The stored steps replayed now, in turn, against their fingerprints: at the first step
    where any op moved beyond the tolerance or only one side has it (else the last), the first
    op that moved (None: none did), how far, and the ops only one side has."""
    steps = baseline.stored()
    played = fingerprint_steps(run, steps[0].step, steps[-1].step, device)
    for stored, now in zip(steps, played, strict=True):
        compared = _compared(baseline, stored, now.prints)
        if compared["first_changed"] or compared["missing"] or compared["new"]:
            break
    return compared | {"steps": [steps[0].step, steps[-1].step]}


def _compared(
    baseline: NumericsBaseline, step: StoredStep, prints: list[OpPrint]
) -> dict[str, Any]:
    stored = [op.fingerprint(i) for i, op in enumerate(step.ops)]
    aligned = align(stored, prints, close_for(baseline.tolerance))
    moved = next(
        (
            _moved(pair, gap)
            for pair in aligned.pairs
            if (gap := relative(pair.a.outputs, pair.b.outputs)) > baseline.tolerance
        ),
        None,
    )
    return {
        "step": step.step,
        "first_changed": moved,
        "missing": len(aligned.unpaired_a),
        "new": len(aligned.unpaired_b),
        "by_statistics": aligned.by_statistics,
        "unpaired": aligned.stretches(),  # side "a": the baseline's, "b": now
        "recorded_with": baseline.torch,
        "torch": torch.__version__,
    }


def _moved(pair: Pair, gap: float) -> dict[str, Any]:
    stored, current = pair.a, pair.b
    moved = {"phase": stored.phase, "module": current.module, "op": stored.op}
    moved |= {"occurrence": stored.occurrence, "relative": gap}
    return moved | ({"now": current.op} if pair.by == "statistics" else {})


def _where(stretches: list[dict[str, Any]]) -> str:
    """Where the op sequence changed first: the earliest unpaired stretch."""
    if not stretches:
        return ""
    s = stretches[0]
    side = "gone" if s["side"] == "a" else "new"
    return f", first {side} in '{s['module']}' ({s['phase']}): {', '.join(s['ops'])}"


def numerics_gate(
    run: Run,
    path: Path,
    update: bool,
    device: torch.device,
    span: tuple[int, int] | None = None,
) -> CheckResult:
    """The gate's ``numerics`` check: write the baseline (of the steps of ``span``) when asked,
    else compare with it, at the steps it holds."""
    if update:
        baseline = capture(run, device, span)
        write_baseline(path, baseline)
        stored = baseline.stored()
        said = f"baseline written to {path}: {sum(len(s.ops) for s in stored)} ops of "
        said += _steps(stored[0].step, stored[-1].step)
        evidence = {"step": baseline.step, "steps": [stored[0].step, stored[-1].step]}
        return CheckResult("numerics", PASS, said, evidence | {"path": str(path)})
    compared = compare(read_baseline(path), run, device)
    moved = compared["first_changed"]
    if moved is None and not compared["missing"] and not compared["new"]:
        said = f"every op of {_steps(*compared['steps'])} as in the baseline"
        return CheckResult("numerics", PASS, said, compared)
    if moved is None:
        said = f"{compared['missing']} op(s) of the baseline gone, {compared['new']} new"
        said += _where(compared["unpaired"])
    else:
        module = f" in '{moved['module']}'" if moved["module"] else ", outside every module,"
        said = (
            f"{moved['op']}{module} ({moved['phase']}, occurrence "
            f"{moved['occurrence']}) moved by {moved['relative']:.3g} relative"
        )
        said += f", now computed by {moved['now']}" if "now" in moved else ""
    versions = f"torch {compared['recorded_with']} then, {compared['torch']} now"
    return CheckResult("numerics", FAIL, f"step {compared['step']}: {said} ({versions})", compared)


def _steps(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}..{last}"
