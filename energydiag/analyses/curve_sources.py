"""Where a curve comes from and which bounds it is judged against: a metric log, a run directory
(whose loss, batches and head give chance and the floor), or the options a user states."""

from __future__ import annotations

import math
from pathlib import Path

from energydiag import findings as rules
from energydiag.analyses.curves import CurveReport, analyse
from energydiag.analyses.early_warning import with_alarms
from energydiag.analyses.rank_logs import rank_finding, rank_logs
from energydiag.contrastive.bounds import candidate_count, infonce_curve_bounds, scored_candidates
from energydiag.contrastive.head import find_head
from energydiag.contrastive.tau import resolve_tau
from energydiag.engine.plugins import build_model
from energydiag.errors import OptionError
from energydiag.io.layout import MANIFEST
from energydiag.io.manifest import ModelSpec
from energydiag.io.metrics import choose_metric, load_metrics
from energydiag.io.rundir import Batch, Run
from energydiag.reference.models import head_span

REFERENCE_MODEL = "energydiag.reference.models:EnergyModel"


def run_bounds(run: Run) -> dict[str, float] | None:
    """InfoNCE bounds from a run: its loss's temperature and candidates (from a logged batch), and
    its head's span."""
    loss = run.manifest.loss
    kind, tau = scored_candidates(loss), resolve_tau(None, loss).value
    if kind is None or tau is None or not run.batch_steps:
        return None
    batch = run.batch(run.batch_steps[0])
    candidates = candidate_count(kind, batch, run.manifest)
    if candidates is None:
        return None
    return infonce_curve_bounds(candidates, tau, _head_span(run.manifest.model, batch))


def _head_span(spec: ModelSpec, batch: Batch) -> float | None:
    """The reference model's span comes from its kwargs (no code runs); any other model is built
    once, and its head found by what it does: the bound does not depend on the weights."""
    if spec.target == REFERENCE_MODEL:
        return head_span(spec.kwargs.get("head", "sigmoid"), spec.kwargs.get("head_kwargs"))
    try:
        head = find_head(build_model(spec), batch.tensors)
    except Exception:  # a model that raises on its own batch: no bound, the rest still holds
        return None
    return None if head is None else head.span


def curve_report(
    source: Path,
    metric: str | None = None,
    window: int | None = None,
    batch_size: int | None = None,
    tau: float | None = None,
    energy_span: float | None = None,
) -> CurveReport:
    """Analyse one metric of a log; InfoNCE bounds from the options, else from the run."""
    source = Path(source)
    frame = load_metrics(source)
    column = choose_metric(frame, metric, source)
    if tau is not None and tau <= 0:
        raise OptionError("the temperature must be positive", "tau", value=tau)
    bounds = None
    if batch_size and tau:
        bounds = infonce_curve_bounds(batch_size, tau, energy_span)
    elif batch_size:  # chance is log B whatever tau is; only the floor needs tau
        bounds = {"chance": math.log(batch_size), "batch_size": batch_size}
    run = Run(source) if (source / MANIFEST).is_file() else None
    if bounds is None and run is not None:
        bounds = run_bounds(run)
    report = with_alarms(analyse(frame, column, window, bounds), frame)
    return with_ranks(report, run) if run is not None else report


def with_ranks(report: CurveReport, run: Run) -> CurveReport:
    """A multi-rank run's curve is rank 0's; every rank's own log says which went first."""
    report.ranks = rank_logs(run)
    found = rank_finding(report.ranks)
    if found is not None:
        report.findings = rules.ranked([found, *report.findings])
    return report
