"""A CI gate: measure a run, compare the numbers with thresholds and a stored baseline.

Measurements come from the recorded artefacts (metrics.jsonl; the latest checkpoint that has a
logged batch, inspected) and, with ``steps``, a fresh replay of that many logged steps. Each check
is a small function that passes, fails with its evidence, or is skipped when its data is absent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from energydiag.analyses.case import Case
from energydiag.analyses.curves import CurveReport, trend
from energydiag.analyses.replaying import replay_report
from energydiag.analyses.timeline import Timeline
from energydiag.io.check_config import CheckConfig
from energydiag.io.rundir import Run
from energydiag.schema import Report, report

PASS, FAIL, SKIP = "passed", "failed", "skipped"
# For the baseline comparison: +1 when larger is better, -1 when smaller is better.
DIRECTION = {
    "loss_end": -1,
    "loss_drop": +1,
    "logit_spread": +1,
    "energy_span": +1,
    "saturation": -1,
    "plateau_fraction": -1,
    "plateau_steps": -1,
    "grad_norm_max": -1,
    "growth_since_first": -1,
}


@dataclass
class CheckResult:
    name: str
    status: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


@report("check")
@dataclass
class CheckReport(Report):
    derived = ("passed", "skipped", "unmeasured")

    run: str
    config: dict[str, float]
    measurements: dict[str, Any]
    checks: list[CheckResult]

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def unmeasured(self) -> list[str]:
        """Why checks were skipped, said once for the run rather than per check."""
        m, why = self.measurements, []
        if "inspected_step" not in m:
            why.append(
                "no checkpoint has a logged batch, so the energy checks measured nothing (record "
                "with persist_batches=True, or keep a batch at each checkpoint's step)"
            )
        if "replay_from" not in m:
            why.append("no replay: give a number of steps to replay and check fidelity")
        return why

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def skipped(self) -> int:
        return sum(c.status == SKIP for c in self.checks)


def measure(
    run: Run, steps: int | None = None, device: torch.device | None = None, case: Case | None = None
) -> dict[str, Any]:
    case = case or Case(run, device)
    m: dict[str, Any] = {}
    losses = run.logged("loss")
    if losses:
        m["logged_steps"] = len(losses)
        m["first_nonfinite_step"] = run.first_failure()
        ends = trend(list(losses.values()))
        if ends:
            m["loss_start"], m["loss_end"] = ends
            m["loss_drop"] = (ends[0] - ends[1]) / abs(ends[0]) if ends[0] else 0.0
    if case.curve:
        m |= _curve(case.curve, losses)
    norms = [v for v in run.logged("grad_norm").values() if math.isfinite(v)]
    if norms:
        m["grad_norm_min"], m["grad_norm_max"] = min(norms), max(norms)
    m |= _weights(case.timeline) | _inspected(case)
    m["schedule_errors"] = [f.code for f in case.schedule_causes() if f.severity == "error"]
    if steps:
        m |= _replayed(run, steps, device)
    return m


def _curve(curve: CurveReport, losses: dict[int, float]) -> dict[str, Any]:
    """The curve against the run's chance and floor, as diagnose reads it: a noisy stall at
    log B is a plateau at chance here too."""
    longest = max(curve.plateaus, key=lambda p: p.length, default=None)
    points = sum(longest.start <= s <= longest.end for s in losses) if longest else 0
    return {
        # non-finite values are the no_nonfinite check's; this one is about the curve's shape
        "curve_errors": [
            f.code for f in curve.findings if f.severity == "error" and f.code != "curve.nonfinite"
        ],
        "plateau_steps": longest.length if longest else 0,
        "plateau_fraction": points / len(losses),
    }


def _inspected(case: Case) -> dict[str, Any]:
    report = case.inspection
    if report is None:
        return {}
    out: dict[str, Any] = {"inspected_step": case.inspected_step}
    if report.batch:
        e = report.batch.energy
        out["energy_span"] = e["energy_max"] - e["energy_min"]
        out["logit_spread"] = e.get("logit_spread")
        out["saturation"] = max((s["fraction"] for s in report.batch.saturation), default=0.0)
        out["retrieval_over_chance"] = e["retrieval_accuracy"] - 1.0 / report.batch.candidates
        out["pos_neg_gap"] = e["pos_neg_gap"]
        out["contrastive_errors"] = [
            f.code
            for f in report.batch.findings
            if f.family in ("contrastive", "loss") and f.severity == "error"
        ]
    return out


def _weights(line: Timeline | None) -> dict[str, Any]:
    """Every checkpoint judged, not only the latest: a run whose last checkpoint is all NaN has
    no finite layer left to measure growth on, while an earlier one may have grown ×1e9."""
    worst = line.worst() if line else None
    if worst is None:
        return {}
    return {
        "weights_step": worst.step,
        "checkpoint_nonfinite": worst.nonfinite,
        "exploded_layers": max(line.exploded_layers(), default=0),
        "growth_since_first": max(r.growth_since_first for r in line.rows if r.readable),
    }


def _replayed(run: Run, steps: int, device: torch.device | None) -> dict[str, Any]:
    logged = set(run.batch_steps)
    starts = [s for s in run.checkpoint_steps if all(t in logged for t in range(s, s + steps))]
    if not starts:
        return {"replay": f"no checkpoint is followed by {steps} logged batches"}
    report = replay_report(run, starts[-1], to_step=starts[-1] + steps - 1, device=device)
    fid = report.fidelity
    return {
        "replay_from": starts[-1],
        # None (skipped, never passed) when no finite pair was compared: NaN = NaN proves nothing
        "replay_max_deviation": fid["max_loss_deviation"],
        "replay_compared": fid["compared"],
        "replay_expected": fid["expected"],
        "replay_fault_step": report.fault.step if report.fault else None,
    }


def evaluate(
    measurements: dict[str, Any], config: CheckConfig, baseline: dict[str, Any] | None = None
) -> list[CheckResult]:
    m, c = measurements, config
    results = [
        _no_nonfinite(m),
        _bound("loss_decreases", m, "loss_drop", low=c.min_loss_drop),
        _bound("no_long_plateau", m, "plateau_fraction", high=c.max_plateau_fraction),
        _bound("plateau_steps", m, "plateau_steps", high=c.max_plateau_steps),
        _bound("logit_spread", m, "logit_spread", low=c.min_logit_spread),
        _bound("energy_span", m, "energy_span", low=c.min_energy_span),
        _bound("saturation", m, "saturation", high=c.max_saturation),
        _bound("grad_norm_floor", m, "grad_norm_min", low=c.min_grad_norm),
        _bound("grad_norm_ceiling", m, "grad_norm_max", high=c.max_grad_norm),
        _bound("replay_fidelity", m, "replay_max_deviation", high=c.max_replay_deviation),
        _bound("retrieval_above_chance", m, "retrieval_over_chance", low=1e-12),
        _bound("energy_gap_sign", m, "pos_neg_gap", low=0.0),
        _bound("not_exploded", m, "exploded_layers", high=0),
        _bound("weight_growth", m, "growth_since_first", high=c.max_weight_growth),
        _no_errors("contrastive_health", m, "contrastive_errors"),
        _no_errors("curve_health", m, "curve_errors"),
        _no_errors("schedule", m, "schedule_errors"),
    ]
    if baseline is not None:
        results.append(_baseline(m, baseline, c.baseline_tolerance))
    return results


def check(
    run: Run,
    config: CheckConfig,
    steps: int | None = None,
    baseline: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> CheckReport:
    measurements = measure(run, steps, device)
    return CheckReport(
        str(run.root), asdict(config), measurements, evaluate(measurements, config, baseline)
    )


def _no_nonfinite(m: dict[str, Any]) -> CheckResult:
    evidence = _pick(m, "first_nonfinite_step", "checkpoint_nonfinite", "replay_fault_step")
    if not evidence:
        return CheckResult(
            "no_nonfinite", SKIP, "no logged loss, checkpoint or replay to look at", {}
        )
    bad = {k: v for k, v in evidence.items() if v}  # a step or a count; None and 0 are clean
    if not bad:
        return CheckResult(
            "no_nonfinite", PASS, "no non-finite loss, checkpoint value or replayed step", evidence
        )
    said = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in bad.items())
    return CheckResult("no_nonfinite", FAIL, f"non-finite values: {said}", evidence)


def _no_errors(name: str, m: dict[str, Any], key: str) -> CheckResult:
    codes = m.get(key)
    if codes is None:
        return CheckResult(name, SKIP, f"no {key.replace('_', ' ')} measured", {})
    if codes:
        return CheckResult(name, FAIL, f"error finding(s): {', '.join(codes)}", {key: codes})
    return CheckResult(name, PASS, "no error findings", {})


def _bound(
    name: str, m: dict[str, Any], key: str, low: float | None = None, high: float | None = None
) -> CheckResult:
    value = m.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return CheckResult(name, SKIP, f"no {key} measured", {})
    evidence = {key: value, "min": low, "max": high}
    if low is not None and value < low:
        return CheckResult(
            name, FAIL, f"{key} {value:.4g} is below the minimum {low:.4g}", evidence
        )
    if high is not None and value > high:
        return CheckResult(
            name, FAIL, f"{key} {value:.4g} is above the maximum {high:.4g}", evidence
        )
    return CheckResult(name, PASS, f"{key} {value:.4g}", evidence)


def _baseline(m: dict[str, Any], baseline: dict[str, Any], tolerance: float) -> CheckResult:
    """Every metric both reports share may be worse than the baseline by at most ``tolerance``."""
    base = baseline.get("measurements", baseline)
    regressions = {}
    for key, sign in DIRECTION.items():
        now, then = m.get(key), base.get(key)
        if not isinstance(now, int | float) or not isinstance(then, int | float):
            continue
        allowed = tolerance * max(abs(then), 1e-12)
        if sign * (then - now) > allowed:
            regressions[key] = {"baseline": then, "now": now, "allowed_change": allowed}
    if not regressions:
        return CheckResult(
            "baseline", PASS, f"no metric regressed by more than {tolerance:.0%}", {}
        )
    worst = ", ".join(f"{k} {v['baseline']:.4g} → {v['now']:.4g}" for k, v in regressions.items())
    return CheckResult("baseline", FAIL, f"regressed against the baseline: {worst}", regressions)


def _pick(m: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: m[k] for k in keys if k in m}
