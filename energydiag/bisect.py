"""Find the first bad step of a run in O(log n) checkpoint evaluations, then replay to it.

A checkpoint is bad when any of its tensors is non-finite, or when the loss on its own step's
batch is. The search assumes badness is monotone (once bad, stays bad); a loop that skips
non-finite steps breaks that, so the visited checkpoints and the logged losses are cross-checked
and a non-monotone run is reported with a warning and searched for its earliest failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from energydiag import findings as rules
from energydiag.diagnose import first_nonfinite_loss
from energydiag.errors import DiagError
from energydiag.plugins import build_loss, build_model
from energydiag.replay import ReplayResult, replay
from energydiag.run import Run, load_checkpoint_file, step_ranges
from energydiag.session import load_checkpoint
from energydiag.state import restore_rng
from energydiag.step import forward

GOOD, BAD, UNREADABLE = "good", "bad", "unreadable"


@dataclass
class Evaluation:
    step: int
    status: str
    reason: str


@dataclass
class BisectResult:
    evaluations: list[Evaluation] = field(default_factory=list)
    last_good: int | None = None
    first_bad_checkpoint: int | None = None
    first_bad_step: int | None = None
    replay: ReplayResult | None = None
    unresolved: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    findings: list[rules.Finding] = field(default_factory=list)

    @property
    def checkpoint_evaluations(self) -> int:
        return sum(e.status != UNREADABLE for e in self.evaluations)

    def to_dict(self) -> dict[str, Any]:
        return {
            "first_bad_step": self.first_bad_step,
            "last_good_checkpoint": self.last_good,
            "first_bad_checkpoint": self.first_bad_checkpoint,
            "checkpoint_evaluations": self.checkpoint_evaluations,
            "step_replays": len(self.replay.steps) if self.replay else 0,
            "evaluations": [e.__dict__ for e in self.evaluations],
            "skipped": [e.__dict__ for e in self.evaluations if e.status == UNREADABLE],
            "unresolved": self.unresolved,
            "warnings": self.warnings,
            "fault": self.replay.fault.to_dict() if self.replay and self.replay.fault else None,
            "findings": [f.to_dict() for f in self.findings],
        }


class CheckpointJudge:
    """Evaluates checkpoints with one model instance, reloading state for each."""

    def __init__(self, run: Run, device: torch.device) -> None:
        self.run, self.device = run, device
        self.model = build_model(run.manifest.model).to(device)
        self.loss_fn = build_loss(run.manifest.loss)
        self.batches = set(run.batch_steps)

    def __call__(self, step: int) -> Evaluation:
        try:
            ckpt = self.run.checkpoint(step)
        except DiagError as err:
            return Evaluation(step, UNREADABLE, err.problem)
        bad = [
            n
            for n, t in {**ckpt.model, **ckpt.optim}.items()
            if t.is_floating_point() and not torch.isfinite(t).all()
        ]
        if bad:
            return Evaluation(step, BAD, f"{len(bad)} non-finite tensor(s), e.g. {bad[0]}")
        if step not in self.batches:
            return Evaluation(step, GOOD, "all tensors finite (no batch logged for this step)")
        return self._loss_verdict(step, ckpt)

    def _loss_verdict(self, step: int, ckpt) -> Evaluation:
        load_checkpoint(ckpt, self.model, None)
        batch = self.run.batch(step)
        restore_rng(batch.rng)
        data = {k: v.to(self.device) for k, v in batch.tensors.items()}
        try:
            with torch.no_grad():
                loss, _ = forward(
                    self.model, self.loss_fn, data, self.device, self.run.manifest.autocast_dtype
                )
        except Exception as err:
            return Evaluation(
                step, BAD, f"the loss on its batch raised {type(err).__name__}: {err}"
            )
        value = float(loss)
        if not math.isfinite(value):
            return Evaluation(
                step, BAD, f"tensors finite, but the loss on its own batch is {value}"
            )
        return Evaluation(step, GOOD, f"tensors finite, loss on its own batch {value:.4g}")


def bisect(
    run: Run,
    good: int | None = None,
    bad: int | None = None,
    device: torch.device | None = None,
    progress: Callable[[Evaluation], None] | None = None,
) -> BisectResult:
    device = device or torch.device("cpu")
    judge = CheckpointJudge(run, device)
    result = BisectResult()

    evaluate = _recording(result, judge, progress)

    steps = _candidates(run, good, bad)
    last_good, first_bad = _search(steps, good is not None, bad is not None, evaluate)
    _check_monotone(result)
    logged_bad = first_nonfinite_loss(run.logged())
    if logged_bad is not None and (
        first_bad is None or (last_good is not None and logged_bad < last_good)
    ):
        result.warnings.append(
            f"non-monotone run: the logged loss is non-finite at step {logged_bad}, yet checkpoint "
            f"{last_good if first_bad is not None else steps[-1]} is good; searching from the earliest failure"
        )
        earlier = [s for s in run.checkpoint_steps if s <= logged_bad]
        last_good, first_bad = (earlier[-1] if earlier else None), logged_bad
    result.last_good, result.first_bad_checkpoint = last_good, first_bad
    if first_bad is not None:
        _locate(result, run, device)
    result.findings = rules.ranked(
        [
            *(result.replay.findings if result.replay else []),
            rules.unresolved_interval(result.unresolved),
            rules.non_monotone(result.warnings),
        ]
    )
    return result


def bisect_timeline(
    timeline: dict[int, Path], progress: Callable[[Evaluation], None] | None = None
) -> BisectResult:
    """Checkpoint-only mode for foreign runs: the first checkpoint holding non-finite values."""
    result = BisectResult()

    evaluate = _recording(result, lambda step: _tensors_verdict(step, timeline[step]), progress)

    result.last_good, result.first_bad_checkpoint = _search(
        sorted(timeline), False, False, evaluate
    )
    _check_monotone(result)
    if result.first_bad_checkpoint is not None:
        result.unresolved = {
            "from": result.last_good,
            "to": result.first_bad_checkpoint,
            "missing_batches": "all",
            "advice": "no batches in checkpoint-only mode: record the run with energydiag.Recorder, or "
            "`energydiag convert --batch STEP=FILE` the batches you have and replay",
        }
    result.findings = rules.ranked(
        [rules.unresolved_interval(result.unresolved), rules.non_monotone(result.warnings)]
    )
    return result


def _recording(
    result: BisectResult,
    judge: Callable[[int], Evaluation],
    progress: Callable[[Evaluation], None] | None,
) -> Callable[[int], Evaluation]:
    """The judge, with every evaluation kept in the result and shown as progress."""

    def evaluate(step: int) -> Evaluation:
        e = judge(step)
        result.evaluations.append(e)
        if progress:
            progress(e)
        return e

    return evaluate


def _tensors_verdict(step: int, path: Path) -> Evaluation:
    try:
        ckpt = load_checkpoint_file(path)
    except DiagError as err:
        return Evaluation(step, UNREADABLE, err.problem)
    bad = [
        n for n, t in ckpt.model.items() if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        return Evaluation(step, BAD, f"{len(bad)} non-finite tensor(s), e.g. {bad[0]}")
    return Evaluation(step, GOOD, "all tensors finite")


def _candidates(run: Run, good: int | None, bad: int | None) -> list[int]:
    steps = run.checkpoint_steps
    if not steps:
        raise DiagError(run.root / "checkpoints", "no checkpoints to bisect")
    for flag, value in (("--good", good), ("--bad", bad)):
        if value is not None and value not in steps:
            raise DiagError(run.root / "checkpoints", f"{flag} {value}: no checkpoint at that step")
    lo = steps.index(good) if good is not None else 0
    hi = steps.index(bad) if bad is not None else len(steps) - 1
    if hi < lo:
        raise DiagError(None, f"--bad {bad} comes before --good {good}")
    return steps[lo : hi + 1]


def _search(
    steps: list[int], good_given: bool, bad_given: bool, evaluate
) -> tuple[int | None, int | None]:
    """(last good, first bad) checkpoint steps; first bad is None when the end is good.

    Invariant: steps[lo] is good (or lo = -1: nothing known good), steps[hi] is bad.
    Unreadable checkpoints are dropped from the list and never counted as bad.
    """
    steps = list(steps)
    lo = 0 if good_given else -1
    if not bad_given:
        while steps and (last := evaluate(steps[-1])).status == UNREADABLE:
            steps.pop()
        if not steps or last.status == GOOD:
            return (steps[-1] if steps else None), None
    hi = len(steps) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        status = evaluate(steps[mid]).status
        if status == UNREADABLE:
            steps.pop(mid)
            hi -= 1
        elif status == BAD:
            hi = mid
        else:
            lo = mid
    return (steps[lo] if lo >= 0 else None), steps[hi]


def _check_monotone(result: BisectResult) -> None:
    seen = sorted((e.step, e.status) for e in result.evaluations if e.status != UNREADABLE)
    first_bad = next((s for s, status in seen if status == BAD), None)
    later_good = [
        s for s, status in seen if status == GOOD and first_bad is not None and s > first_bad
    ]
    if later_good:
        result.warnings.append(
            f"non-monotone run: checkpoint {first_bad} is bad but later checkpoint {later_good[0]} is good"
        )


def _locate(result: BisectResult, run: Run, device: torch.device) -> None:
    """Replay from the last good checkpoint to the exact failing step, or say what is missing."""
    start, stop = result.last_good, result.first_bad_checkpoint
    if start is None:
        result.unresolved = {
            "from": None,
            "to": stop,
            "missing_batches": None,
            "advice": "the earliest checkpoint is already bad: record from an earlier step",
        }
        return
    have = set(run.batch_steps)
    missing = [s for s in range(start, stop + 1) if s not in have]
    usable_to = (missing[0] - 1) if missing else stop
    if usable_to >= start:
        result.replay = replay(run, start, to_step=usable_to, device=device)
        if result.replay.fault:
            result.first_bad_step = result.replay.fault.step
            return
    if missing:
        gap = max(stop - start, 1)
        result.unresolved = {
            "from": start,
            "to": stop,
            "missing_batches": step_ranges(missing),
            "advice": f"log the batches for steps {step_ranges(missing)}: e.g. Recorder(keep_batches>={gap}) "
            f"or persist_batches=True, or checkpoint more often than every {gap} steps",
        }
    elif result.replay and not result.replay.fault:
        result.first_bad_step = stop  # the checkpoint itself is bad but its replay was clean
