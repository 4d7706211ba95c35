"""One-shot diagnosis of a run: the path a person would take, automated.

If the run failed (a non-finite loss or gradient norm in the log, or failure.json, which also
records exceptions), replay to the failing step and localise it. Otherwise inspect the latest
checkpoint that has a logged batch (against the run's first checkpoint) and analyse the loss
curve. The verdict is never "healthy" while any of them reports an error, and a run with nothing
to replay says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from energydiag import findings as rules
from energydiag.analyses.bisection import bisect_checkpoints
from energydiag.analyses.case import Case
from energydiag.analyses.checkpoint_report import checkpoint_report
from energydiag.analyses.curves import trend
from energydiag.analyses.rank_logs import rank_findings
from energydiag.analyses.rank_replay import replay_ranks
from energydiag.analyses.replaying import replay_report
from energydiag.analyses.story import tell
from energydiag.engine.localise import Fault
from energydiag.errors import DiagError, OptionError
from energydiag.io.layout import MANIFEST
from energydiag.io.rundir import Run
from energydiag.schema import Report, report

WEIGHT_FAILURES = ("checkpoint.nonfinite", "checkpoint.exploded", "checkpoint.grown")
TIMELINE = ("timeline.exploded", "timeline.nonfinite")
NONFINITE_WEIGHTS = ("checkpoint.nonfinite", "timeline.nonfinite")
EXPLODED_WEIGHTS = ("checkpoint.exploded", "checkpoint.grown", "timeline.exploded")


class Verdict(str, Enum):
    """One word per run (a str, so that JSON and renderers read the word itself)."""

    HEALTHY = "healthy"
    UNCHECKED = "unchecked"  # no checkpoint had a batch to replay or inspect
    NONFINITE = "non-finite"
    NOT_LOCALISED = "non-finite (not localised)"
    NOT_REPRODUCED = "non-finite in the log, but finite on replay"
    EXPLODED = "exploded"
    STALLED = "stalled"
    UNSYNCHRONISED = "ranks out of sync"  # copies that should agree (or seem to) differ

    def __str__(self) -> str:  # the word, on every Python (3.10 has no StrEnum)
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)

    @property
    def failed(self) -> bool:
        return self not in (Verdict.HEALTHY, Verdict.UNCHECKED)


@report("diagnose")
@dataclass
class Diagnosis(Report):
    derived = ("failed",)

    run: str
    verdict: Verdict
    loss_start: float | None
    loss_end: float | None
    fault: Fault | None
    findings: list[rules.Finding] = field(default_factory=list)
    inspected_step: int | None = None  # the checkpoint whose batch was run (the last healthy one)

    @property
    def failed(self) -> bool:
        """Exit 1: a fault, an error finding, or a failing verdict. A healthy run with warnings,
        or one that could not be fully checked ("unchecked"), is not a failure."""
        return self.fault is not None or rules.has_error(self.findings) or self.verdict.failed


def diagnose(run: Run, device: torch.device | None = None, case: Case | None = None) -> Diagnosis:
    case = case or Case(run, device)
    losses = run.logged()
    start, end = trend(list(losses.values())) or (None, None)
    causes = case.schedule_causes()
    failed = run.first_failure()
    if failed is not None:
        result = _failed(run, failed, start, end, device)
        seen = {f.code for f in causes}  # the run-wide schedule, not the replay's window twice
        weights = case.timeline.findings if case.timeline else []  # what `timeline` reports
        ranks = rank_findings(run)
        seen |= {f.code for f in ranks}
        found = [*causes, *ranks, *(f for f in result.findings if f.code not in seen), *weights]
        found = _superseded(found, _alarms(case))
        result.findings = rules.ranked([*tell(case, found, result.fault, device), *found])
        return result
    cause_codes = {f.code for f in causes}  # inspect names them too: said once
    inspected = [f for f in _inspected(case) if f.code not in cause_codes]
    found = (case.curve.findings if case.curve else []) + _weights(case) + inspected + causes
    found += _never_updated(run)
    found = _superseded(found, _alarms(case))
    found += [f for f in (rules.offset_drift(case.offsets),) if f is not None]
    found = _ranks_view(found, rank_findings(run))
    found = [*tell(case, found, None, device), *found]
    verdict = Verdict.HEALTHY
    if any(f.code == "ranks.diverged" and f.severity == "error" for f in found):
        verdict = Verdict.UNSYNCHRONISED
    elif any(rules.has_code(found, code) for code in EXPLODED_WEIGHTS):
        verdict = Verdict.EXPLODED
    elif any(rules.has_code(found, code) for code in NONFINITE_WEIGHTS):
        verdict = Verdict.NONFINITE
    elif rules.has_error(found):
        verdict = Verdict.STALLED
    elif not run.checkpoints_with_batches:
        verdict = Verdict.UNCHECKED
    return Diagnosis(
        str(run.root), verdict, start, end, None, rules.ranked(found), case.inspected_step
    )


def _never_updated(run: Run) -> list[rules.Finding]:
    """Under a GradScaler a logged non-finite gradient norm is a skipped step, not a failure
    (``Run.first_failure``); a run that skipped every step still trained nothing."""
    if not run.manifest.scaler:
        return []
    norms = run.logged_series(("grad_norm",))["grad_norm"]
    skipped = [step for step, norm in sorted(norms.items()) if not math.isfinite(norm)]
    if not skipped or len(skipped) < len(norms):  # the scales are read only when it matters
        return []
    kept = set(run.batch_steps)
    rows = [{"step": s, "scale": _scale_at(run, s) if s in kept else None} for s in skipped]
    found = rules.never_updated(rows, len(norms))
    return [found] if found else []


def _scale_at(run: Run, step: int) -> float | None:
    state = run.batch(step).scaler_state
    return state.get("scale") if state else None


def _superseded(found: list[rules.Finding], alarms: list[rules.Finding]) -> list[rules.Finding]:
    """What the monitors said live replaces what they would have said offline."""
    offline = ("curve.would_alarm", "timeline.would_alarm")
    return [f for f in found if not (alarms and f.code in offline)] + alarms


def _alarms(case: Case) -> list[rules.Finding]:
    """The alarms the Recorder raised, scored against the run's log."""
    logged = case.run.logged()
    last = max(logged) if logged else None
    alarm = rules.recorded_alarms(case.alerts, case.run.first_failure(), last)
    return [alarm] if alarm else []


def _failed(run: Run, step: int, start, end, device) -> Diagnosis:
    """Replay through the failing step from the checkpoint before it, when its batches are there:
    the step that broke the weights may come before the one whose loss is NaN. If that replay
    stays healthy (the state changed outside the recorded steps), replay from the checkpoint at
    or before the failure itself, and keep what the first replay showed."""
    if run.manifest.distributed:
        return _failed_on_ranks(run, step, start, end, device)
    origins = sorted({s for s in run.checkpoint_steps if s < step}, reverse=True)[:1]
    origins += [step] if not origins or run.checkpoint_at_or_before(step) != origins[0] else []
    reports, problem = [], None
    for origin in origins:
        try:
            reports.append(replay_report(run, origin, to_step=step, device=device))
        except DiagError as err:  # batches or checkpoints missing: try the nearer start
            if err.path == str(run.manifest_path):  # the run cannot be built at all: bad input
                raise
            problem = problem or str(err)
            continue
        if reports[-1].fault:
            break
    if not reports:
        why = rules.cannot_replay(step, problem or "no checkpoint at or before it")
        return Diagnosis(str(run.root), Verdict.NOT_LOCALISED, start, end, None, [why])
    report, earlier = reports[-1], reports[:-1]
    unseen = [f for r in earlier for f in r.findings if f.code == "replay.unseen_event"]
    verdict = Verdict.NONFINITE if report.fault else Verdict.NOT_REPRODUCED
    found = rules.ranked([*report.findings, *unseen])
    return Diagnosis(str(run.root), verdict, start, end, report.fault, found)


def _failed_on_ranks(run: Run, step: int, start, end, device) -> Diagnosis:
    """A multi-rank run: its recorded ranks replay from the checkpoint before the failure."""
    before = [s for s in run.checkpoint_steps if s < step] or [run.checkpoint_at_or_before(step)]
    kind = device.type if device is not None else "cpu"
    merged = replay_ranks(str(run.root), before[-1], step, run.manifest.world_size, kind)
    verdict = Verdict.NONFINITE if merged.fault else Verdict.NOT_REPRODUCED
    found = rules.ranked(merged.findings)
    return Diagnosis(str(run.root), verdict, start, end, merged.fault, found)


def _ranks_view(found: list[rules.Finding], ranks: list[rules.Finding]) -> list[rules.Finding]:
    """A run whose ranks train their own copies has few negatives because of it: the rank
    finding says so with the remedies that change the effective batch, and replaces the
    single-rank view of the same fact."""
    if rules.has_code(ranks, "ranks.negatives"):
        found = [f for f in found if f.code != "contrastive.few_negatives"]
    return [*found, *ranks]


def _weights(case: Case) -> list[rules.Finding]:
    """Every checkpoint on the timeline; the one the run is judged by (its first non-finite,
    else its most grown) against the first for the layer-level detail; when the weights broke,
    a checkpoint-only bisect names the interval (O(log n) more)."""
    line = case.timeline
    worst = line.worst() if line else None
    if worst is None:
        return []
    run = case.run
    paths = run.checkpoint_paths()
    judged = checkpoint_report(
        paths[worst.step], run.manifest.autocast_dtype, paths[min(paths)]
    ).findings
    broken = [f for f in [*judged, *line.findings] if f.code in WEIGHT_FAILURES + TIMELINE]
    if not broken:
        return []
    search = bisect_checkpoints(paths, predicate="any")
    interval = rules.weights_broke_between(search.last_good_checkpoint, search.first_bad_checkpoint)
    return rules.ranked([interval, *broken])


def _inspected(case: Case) -> list[rules.Finding]:
    if case.inspected_step is None:
        return [rules.no_batches(case.run.checkpoint_steps)]
    return case.inspection.findings


def diagnose_folder(folder: Path) -> list[Diagnosis]:
    """Every run directory directly inside ``folder``."""
    folder = Path(folder)
    runs = (
        sorted(p for p in folder.glob("*") if (p / MANIFEST).is_file()) if folder.is_dir() else []
    )
    if not runs:
        raise OptionError(
            "no run directories here (see fixtures/make_fixtures.py)", "fixtures", path=folder
        )
    return [diagnose(Run(p)) for p in runs]
