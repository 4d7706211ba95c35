"""A replay with its verdicts: how faithful it was, what it could not see, what broke and why.

Fidelity is "bit-exact" only with at least one finite pair of losses compared and every
compared pair (and every parameter checkpoint reached) identical; NaN against NaN is agreement
on failure, not evidence of exactness. What the replay lacked (optimizer state, RNG,
hyperparameters, the recording machine) decides what precision of match to expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from energydiag import findings as rules
from energydiag.analyses.ladder import Ladder, precision_ladder
from energydiag.analyses.schedule import history, jumps
from energydiag.contrastive.quantities import STANDARD
from energydiag.engine.localise import Fault
from energydiag.engine.replay import Progress, ReplayResult, replay, replay_columns
from energydiag.io.rundir import Run
from energydiag.schema import Record, Report, report

APPROXIMATE_TOLERANCE = 1e-4  # relative loss deviation expected from float rounding alone


@dataclass
class ReplayReport:
    result: ReplayResult
    fidelity: dict[str, Any]
    schedule_jumps: list[dict[str, Any]]
    findings: list[rules.Finding] = field(default_factory=list)
    ladder: Ladder | None = None

    @property
    def fault(self) -> Fault | None:
        return self.result.fault

    def summary(self) -> ReplaySummary:
        """What the replay found, as data: the per-step rows, not the replayed tensors."""
        steps = self.result.steps
        return ReplaySummary(
            checkpoint_step=self.result.checkpoint_step,
            first_step=steps[0]["step"] if steps else None,
            last_step=steps[-1]["step"] if steps else None,
            fault=self.result.fault,
            fidelity=self.fidelity,
            schedule_jumps=self.schedule_jumps,
            precision_ladder=self.ladder,
            skipped_steps=[
                {"step": r["step"], "scale": r["scale"]} for r in steps if r.get("skipped")
            ],
            findings=self.findings,
            columns=replay_columns(steps, STANDARD),
            steps=steps,
        )


@dataclass
class RankOutcome(Record):
    rank: int
    fault: Fault | None
    bit_exact: bool | None


@report("replay")
@dataclass
class ReplaySummary(Report):
    checkpoint_step: int
    first_step: int | None
    last_step: int | None
    fault: Fault | None
    fidelity: dict[str, Any]
    schedule_jumps: list[dict[str, Any]]
    precision_ladder: Ladder | None
    skipped_steps: list[dict[str, Any]]
    findings: list[rules.Finding]
    columns: dict[str, Any]
    steps: list[dict[str, Any]]
    ranks: list[RankOutcome] = field(default_factory=list)  # a multi-rank replay: each rank
    placement: str | None = None  # where a multi-rank replay ran (gloo CPU processes, NCCL)


def fidelity(result: ReplayResult) -> dict[str, Any]:
    pairs = [
        (r["loss"], r["logged_loss"]) for r in result.steps if r.get("logged_loss") is not None
    ]
    finite = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    both_bad = sum(not math.isfinite(a) and not math.isfinite(b) for a, b in pairs)
    mismatched = len(pairs) - len(finite) - both_bad
    loss_dev = max((abs(a - b) for a, b in finite), default=None)
    rel_dev = max((abs(a - b) / max(abs(b), 1e-12) for a, b in finite), default=None)
    param_dev = max((c["max_abs_diff"] for c in result.parameter_checks), default=None)
    exact = bool(finite) and loss_dev == 0.0 and mismatched == 0 and param_dev in (None, 0.0)
    return {
        "compared": len(finite),
        "nonfinite_on_both": both_bad,
        "mismatched": mismatched,
        "max_loss_deviation": loss_dev,
        "max_relative_deviation": rel_dev,
        "parameter_checks": result.parameter_checks,
        "max_parameter_deviation": param_dev,
        "bit_exact": exact,
        "expected": "approximate"
        if (result.missing or result.environment or result.nondeterministic)
        else "bit-exact",
        "missing": list(result.missing.values()),
        "environment": result.environment
        + [f"no deterministic kernel: {op}" for op in result.nondeterministic],
    }


def unseen_event(result: ReplayResult) -> int | None:
    """A step the log records as non-finite while the replay computed it finite."""
    for row in result.steps:
        logged = row.get("logged_loss")
        if logged is not None and not math.isfinite(logged) and math.isfinite(row["loss"]):
            return row["step"]
    return None


def replay_report(
    run: Run,
    from_step: int,
    to_step: int | None = None,
    device: torch.device | None = None,
    every: int = 0,
    progress: Progress | None = None,
    ladder: bool = False,
) -> ReplayReport:
    """Replay and judge it; with ``ladder``, climb the precision ladder on the failing step."""
    result = replay(run, from_step, to_step, device, every, progress, STANDARD)
    report = judge_replay(run, result)
    if ladder and result.fault and result.fault.reproduced:
        report.ladder = precision_ladder(run, result.fault.step, device)
        report.findings = rules.ranked([*report.findings, *report.ladder.findings])
    return report


def judge_replay(run: Run, result: ReplayResult) -> ReplayReport:
    """Verdicts on a finished replay."""
    fid = fidelity(result)
    last = result.steps[-1]["step"] if result.steps else result.checkpoint_step
    # The schedule the replay applied; checkpoints' param groups when batches recorded none.
    schedule = result.hyperparameters or history(run, result.checkpoint_step, last + 1)
    found = [j.to_dict() for j in jumps(schedule)]
    report = ReplayReport(result, fid, found)
    report.findings = rules.ranked(
        [
            rules.explain_fault(result.fault) if result.fault else None,
            rules.schedule_jumps(found),
            rules.unseen_event(unseen_event(result), fid),
            rules.fidelity(fid, APPROXIMATE_TOLERANCE),
            rules.skipped_steps([r for r in result.steps if r.get("skipped")]),
        ]
    )
    return report
