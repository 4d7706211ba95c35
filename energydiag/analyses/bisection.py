"""Find the first unhealthy checkpoint in O(log n) evaluations, then replay to the exact step.

"Unhealthy" is a predicate the user can choose: non-finite tensors; exploded weights (a layer's
max|w| grown ×1e3 past the first good checkpoint, every value still finite); a non-finite loss
on the checkpoint's own batch; or any of them (the default). The search assumes badness is
monotone. A run that recovers (a loop that skips non-finite steps) breaks that, and is called
non-monotone only with evidence: an evaluated checkpoint that is bad, then a later one that is
healthy by the same predicate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from energydiag import findings as rules
from energydiag.analyses.checkpoint_stats import CheckpointStats
from energydiag.analyses.judge import BAD, GOOD, UNREADABLE, Evaluation, Judge
from energydiag.analyses.replaying import ReplayReport, judge_replay
from energydiag.analyses.schedule import schedule_causes, schedule_evidence
from energydiag.analyses.timeline import GROWTH_LIMIT
from energydiag.engine.localise import Fault
from energydiag.engine.quantities import LayerMaxAbs
from energydiag.engine.replay import replay
from energydiag.errors import DiagError, OptionError
from energydiag.io.layout import CHECKPOINTS
from energydiag.io.rundir import Run, step_ranges
from energydiag.schema import Report, report

GROWTH = (LayerMaxAbs,)


@report("bisect")
@dataclass
class BisectResult(Report):
    derived = ("checkpoint_evaluations", "skipped")

    predicate: str = "any"
    evaluations: list[Evaluation] = field(default_factory=list)
    last_good_checkpoint: int | None = None
    first_bad_checkpoint: int | None = None
    first_bad_step: int | None = None
    first_logged_failure: int | None = None
    first_nonfinite_step: int | None = None  # where the replay went non-finite, if it did
    exploded_step: int | None = None  # where the replay's weights crossed ×GROWTH_LIMIT
    fault: Fault | None = None  # what the replay to the exact step localised
    step_replays: int = 0
    unresolved: dict[str, Any] | None = None
    # (healthy replay from, bad checkpoint it missed): the change came from outside the steps
    changed_outside_steps: tuple[int, int] | None = None
    warnings: list[str] = field(default_factory=list)  # evidence of a recovery (non-monotone)
    notes: list[str] = field(default_factory=list)  # what the search saw that is not a recovery
    findings: list[rules.Finding] = field(default_factory=list)

    @property
    def checkpoint_evaluations(self) -> int:
        return sum(e.status != UNREADABLE for e in self.evaluations)

    @property
    def skipped(self) -> list[Evaluation]:
        return [e for e in self.evaluations if e.status == UNREADABLE]

    def adopt(self, replayed: ReplayReport) -> None:
        """Keep what a replay found (its fault, its length, its findings), not its tensors."""
        self.fault, self.step_replays = replayed.fault, len(replayed.result.steps)
        self.findings = replayed.findings


def bisect(
    run: Run,
    good: int | None = None,
    bad: int | None = None,
    device: torch.device | None = None,
    progress: Callable[[Evaluation], None] | None = None,
    predicate: str = "any",
) -> BisectResult:
    """Bisect a run directory, then replay from the last good checkpoint to the failing step."""
    paths = run.checkpoint_paths()
    if not paths:
        raise DiagError(run.root / CHECKPOINTS, "no checkpoints to bisect")
    judge = Judge(paths, predicate, run, device)  # one judge: the growth reference is shared
    result = _search_checkpoints(judge, good, bad, progress)
    result.first_logged_failure = run.first_failure()
    start, stop = _reconcile_with_log(result, judge)
    if stop is not None:
        _locate(result, run, start, stop, device or torch.device("cpu"), judge.reference)
    _finish(result, schedule_causes(schedule_evidence(run)))
    return result


def bisect_checkpoints(
    paths: dict[int, Path],
    good: int | None = None,
    bad: int | None = None,
    progress: Callable[[Evaluation], None] | None = None,
    predicate: str = "any",
) -> BisectResult:
    """Checkpoint-only mode for foreign runs: tensors alone, no batches to replay."""
    if not paths:
        raise DiagError(None, "no checkpoints to bisect")
    result = _search_checkpoints(Judge(paths, predicate), good, bad, progress)
    if result.first_bad_checkpoint is not None:
        result.unresolved = {
            "from": result.last_good_checkpoint,
            "to": result.first_bad_checkpoint,
            "missing_batches": "all",
            "advice": "no batches in checkpoint-only mode: record the run with energydiag.Recorder, "
            "or convert the batches you have into a run (`energydiag convert`) and replay",
        }
    _finish(result)
    return result


def _search_checkpoints(
    judge: Judge, good: int | None, bad: int | None, progress: Callable[[Evaluation], None] | None
) -> BisectResult:
    result = BisectResult(judge.predicate)

    def evaluate(step: int) -> Evaluation:
        e = judge(step)
        result.evaluations.append(e)
        if progress:
            progress(e)
        return e

    steps = _candidates(sorted(judge.paths), good, bad)
    result.last_good_checkpoint, result.first_bad_checkpoint = _search(
        steps, bad is not None, evaluate
    )
    if all(e.status == UNREADABLE for e in result.evaluations):
        raise DiagError(judge.paths[steps[0]].parent, "every checkpoint evaluated is unreadable")
    _check_monotone(result)
    return result


def _candidates(steps: list[int], good: int | None, bad: int | None) -> list[int]:
    for option, value in (("good", good), ("bad", bad)):
        if value is not None and value not in steps:
            have = step_ranges(steps)
            raise OptionError(f"no checkpoint at that step (have {have})", option, value=value)
    lo = steps.index(good) if good is not None else 0
    hi = steps.index(bad) if bad is not None else len(steps) - 1
    if hi < lo:
        raise OptionError(f"comes before the good checkpoint {good}", "bad", value=bad)
    return steps[lo : hi + 1]


def _search(steps: list[int], bad_given: bool, evaluate) -> tuple[int | None, int | None]:
    """(last good, first bad) checkpoint steps; first bad is None when the end is good.

    The first candidate is always evaluated: it is the reference the explosion predicate
    measures growth against, and a bad first checkpoint means the run was bad from the start.
    Unreadable checkpoints are dropped from the list and never counted as bad.
    """
    steps = list(steps)
    while steps and (first := evaluate(steps[0])).status == UNREADABLE:
        steps.pop(0)
    if not steps:
        return None, None
    if first.status == BAD:
        return None, steps[0]
    if not bad_given:
        while len(steps) > 1 and (last := evaluate(steps[-1])).status == UNREADABLE:
            steps.pop()
        if len(steps) == 1 or last.status == GOOD:
            return steps[-1], None
    lo, hi = 0, len(steps) - 1
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
    return steps[lo], steps[hi]


def _check_monotone(result: BisectResult) -> None:
    seen = sorted((e.step, e.status) for e in result.evaluations if e.status != UNREADABLE)
    first_bad = next((s for s, status in seen if status == BAD), None)
    later_good = [
        s for s, status in seen if status == GOOD and first_bad is not None and s > first_bad
    ]
    if later_good:
        result.warnings.append(
            f"non-monotone run: checkpoint {first_bad} is bad but later checkpoint {later_good[0]} "
            "is healthy by the same predicate"
        )


def _reconcile_with_log(result: BisectResult, judge: Judge) -> tuple[int | None, int | None]:
    """The interval to replay: the search's, unless the log (loss, gradient norm,
    failure.json) fails before any bad checkpoint; then from the checkpoint before that step.

    A log failure that no checkpoint shows is called non-monotone only when the checkpoint at or
    after it is bad by the same predicate and a later one is healthy.
    """
    logged, bad = result.first_logged_failure, result.first_bad_checkpoint
    if logged is None:
        return result.last_good_checkpoint, bad
    if bad is not None and logged >= bad:
        # the weights went bad first (exploded, still finite): one replay from the last good
        # checkpoint names both the step they crossed the limit and the first non-finite step
        return result.last_good_checkpoint, logged
    steps = sorted(judge.paths)
    after = [s for s in steps if s >= logged]
    if bad is None and after:
        evidence = judge(after[0])
        result.evaluations.append(evidence)
        if evidence.status == BAD:
            result.first_bad_checkpoint = evidence.step
            if evidence.step < steps[-1]:
                result.warnings.append(
                    f"non-monotone run: the log fails at step {logged} and checkpoint "
                    f"{evidence.step} is bad, yet the last checkpoint {steps[-1]} is healthy by "
                    "the same predicate"
                )
    if result.first_bad_checkpoint is None or result.first_bad_checkpoint > logged:
        result.notes.append(
            f"the log fails at step {logged}, before any checkpoint this predicate calls bad"
        )
    before = [s for s in steps if s <= logged]
    return (before[-1] if before else None), logged


def _locate(
    result: BisectResult,
    run: Run,
    start: int | None,
    stop: int,
    device: torch.device,
    reference: CheckpointStats | None = None,
) -> None:
    """Replay from ``start`` (a checkpoint) to the failing step. When that cannot reach or see the
    failure, replay the bad checkpoint's own step: its state holds whatever changed, even a
    change outside the recorded steps. Otherwise say what is missing."""
    if run.manifest.distributed and start is not None:  # its ranks replay in their own processes
        result.unresolved = {
            "from": start,
            "to": stop,
            "missing_batches": None,
            "ranks": run.manifest.world_size,
            "advice": f"replay the interval on the run's {run.manifest.world_size} ranks, from "
            f"step {start} to step {stop}",
        }
        return
    unresolved = (
        _replay_interval(result, run, start, stop, device, reference) if start is not None else None
    )
    if start is not None and unresolved is None:
        return
    own = max((s for s in run.checkpoint_steps if s <= stop), default=None)
    if own is not None and own != start and own in set(run.batch_steps):
        report = judge_replay(run, replay(run, own, to_step=own, device=device))
        if report.fault and report.fault.phase != "state":  # a broken checkpoint proves nothing
            result.adopt(report)
            result.first_bad_step = report.fault.step
            result.first_nonfinite_step = report.fault.step
            if unresolved is not None and unresolved["missing_batches"] is None:
                # the interval replayed healthy: the change came from outside the steps
                result.changed_outside_steps = (start, own)
            return
    result.unresolved = unresolved or {
        "from": None,
        "to": stop,
        "missing_batches": None,
        "advice": "the earliest checkpoint is already bad: record from an earlier step",
    }


def _replay_interval(
    result: BisectResult,
    run: Run,
    start: int,
    stop: int,
    device: torch.device,
    reference: CheckpointStats | None,
) -> dict[str, Any] | None:
    """None when the replay located the step; else the unresolved interval and its advice."""
    have = set(run.batch_steps)
    missing = [s for s in range(start, stop + 1) if s not in have]
    usable_to = (missing[0] - 1) if missing else stop
    if usable_to >= start:
        replayed = replay(run, start, to_step=usable_to, device=device, every=1, quantities=GROWTH)
        report = judge_replay(run, replayed)
        result.adopt(report)
        fault = report.fault
        result.exploded_step = _grew_at(replayed.steps, reference)
        result.first_nonfinite_step = fault.step if fault else None
        by_growth = result.predicate in ("any", "exploded") and result.exploded_step is not None
        if fault or by_growth:
            steps = [result.first_nonfinite_step, result.exploded_step if by_growth else None]
            result.first_bad_step = min(s for s in steps if s is not None)
            return None
    if missing:
        gap = max(stop - start, 1)
        return {
            "from": start,
            "to": stop,
            "missing_batches": step_ranges(missing),
            "advice": f"log the batches for steps {step_ranges(missing)}: e.g. Recorder(keep_batches>={gap}) "
            f"or persist_batches=True, or checkpoint more often than every {gap} steps",
        }
    # ``stop`` is a bad checkpoint, or the log's failing step: name only what exists
    bad = (
        f"checkpoint {stop} is bad"
        if stop in set(run.checkpoint_steps)
        else (f"the log fails at step {stop}")
    )
    return {
        "from": start,
        "to": stop,
        "missing_batches": None,
        "advice": f"the replay from checkpoint {start} through step {usable_to} stays healthy, yet "
        f"{bad}: the run directory does not hold what changed (a hyperparameter, optimizer "
        "state, weights edited outside the step)",
    }


def _grew_at(rows: list[dict[str, Any]], reference: CheckpointStats | None) -> int | None:
    """The first step after which a layer's max|w| is ×GROWTH_LIMIT its value in the reference
    checkpoint (the judge's first good one): the checkpoints' own explosion test, per step."""
    if reference is None:
        return None
    before = {name: r["max_abs"] for name, r in reference.model_layers().items()}
    for row in rows:
        for key, value in row.items():
            layer = key.removeprefix("max_abs/")
            base = before.get(layer, math.nan) if key.startswith("max_abs/") else math.nan
            if math.isfinite(base) and base > 0 and value >= GROWTH_LIMIT * base:
                return row["step"]
    return None


def _finish(result: BisectResult, causes: list[rules.Finding] | None = None) -> None:
    result.findings = rules.ranked(
        [
            *(causes or []),
            *result.findings,
            rules.unresolved_interval(result.unresolved),
            rules.changed_outside_steps(result.changed_outside_steps),
            rules.non_monotone(result.warnings),
            rules.log_before_checkpoints(result.notes),
        ]
    )
