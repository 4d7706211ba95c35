"""A run directory's curve: the bounds its loss, batches and head give (chance, the floor), and
what every rank's own log says. Building the head needs torch, which a log file alone does not."""

from __future__ import annotations

from energydiag import findings as rules
from energydiag.analyses.curves import CurveReport
from energydiag.analyses.rank_logs import rank_finding, rank_logs
from energydiag.contrastive.bounds import candidate_count, infonce_curve_bounds, scored_candidates
from energydiag.contrastive.head import find_head
from energydiag.contrastive.tau import resolve_tau
from energydiag.engine.plugins import build_model
from energydiag.io.manifest import ModelSpec
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


def with_ranks(report: CurveReport, run: Run) -> CurveReport:
    """A multi-rank run's curve is rank 0's; every rank's own log says which went first."""
    report.ranks = rank_logs(run)
    found = rank_finding(report.ranks)
    if found is not None:
        report.findings = rules.ranked([found, *report.findings])
    return report
