"""Exact, instrumented replay of a run's training steps from a checkpoint.

Two tiers keep it fast. Every step runs the run's own training step plus a cheap check: loss,
global gradient norm and parameter norm after the update, gathered into one tensor and synced
once. Only when that check fails is the state before the failing step rebuilt and the step re-run
fully instrumented (energydiag.localise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from energydiag import findings as rules
from energydiag.errors import DiagError
from energydiag.localise import Fault, localise
from energydiag.probe import Probe
from energydiag.quantities import (
    energy_stats,
    global_norm,
    layer_grad_norms,
    scored_energies,
    snapshot_params,
    update_ratio,
)
from energydiag.run import Batch, Run
from energydiag.session import Session, open_session

Progress = Callable[[dict[str, Any]], None]


@dataclass
class ReplayResult:
    checkpoint_step: int
    steps: list[dict[str, Any]]
    fault: Fault | None = None
    findings: list[rules.Finding] = field(default_factory=list)

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.steps)

    @property
    def fidelity(self) -> tuple[float | None, int]:
        """(largest |replayed - logged| loss, steps compared); NaN vs NaN counts as agreement."""
        devs = [
            _deviation(r["loss"], r["logged_loss"])
            for r in self.steps
            if r.get("logged_loss") is not None
        ]
        return (max(devs) if devs else None), len(devs)

    def to_dict(self) -> dict[str, Any]:
        max_dev, compared = self.fidelity
        return {
            "checkpoint_step": self.checkpoint_step,
            "first_step": self.steps[0]["step"] if self.steps else None,
            "last_step": self.steps[-1]["step"] if self.steps else None,
            "fault": self.fault.to_dict() if self.fault else None,
            "fidelity": {
                "max_loss_deviation": max_dev,
                "compared": compared,
                "bit_exact": max_dev == 0.0,
            },
            "findings": [f.to_dict() for f in self.findings],
            "steps": self.steps,
        }


def plan(run: Run, start: int, to_step: int | None) -> list[int]:
    """The contiguous logged steps to replay from checkpoint ``start`` through ``to_step``."""
    if to_step is None:
        logged = set(run.batch_steps)
        to_step = start
        while to_step + 1 in logged:
            to_step += 1
        if start not in logged:
            raise DiagError(
                run.root / "batches", f"no batch logged for step {start} (the checkpoint's step)"
            )
    if to_step < start:
        raise DiagError(None, f"--to-step {to_step} is before the checkpoint at step {start}")
    return run.require_batches(start, to_step)


def replay(
    run: Run,
    from_step: int,
    to_step: int | None = None,
    device: torch.device | None = None,
    every: int = 0,
    progress: Progress | None = None,
) -> ReplayResult:
    """Replay from the checkpoint at or before ``from_step``; stop at the first non-finite value.

    ``every`` > 0 records full statistics (energies, saturation, per-layer gradient norms, update
    ratio) every that many steps; the others only run the cheap check.
    """
    if to_step is not None and to_step < from_step:
        raise DiagError(None, f"--to-step {to_step} is before --from-step {from_step}")
    device = device or torch.device("cpu")
    session = open_session(run, from_step, device)
    logged = run.logged()
    result = ReplayResult(session.step, [])
    for step in plan(run, session.step, to_step):
        row = run_step(session, run.batch(step), stats=every > 0 and step % every == 0)
        row["logged_loss"] = logged.get(step)
        result.steps.append(row)
        if progress:
            progress(row)
        if not row["finite"]:
            result.fault = diagnose(run, step, device, first_loss=row["loss"])
            break
    result.findings = rules.ranked(
        [
            rules.explain_fault(result.fault) if result.fault else None,
            rules.fidelity(*result.fidelity),
        ]
    )
    return result


def run_step(
    session: Session, batch: Batch, stats: bool = False, update: bool | None = None
) -> dict[str, Any]:
    """One real training step plus the cheap check: a single host sync."""
    model = session.model
    before = snapshot_params(model) if stats else None
    probe = Probe(model, detail="stack", check_finite=False) if stats else None
    try:
        result = session.train(batch, observe=probe.attached() if probe else None, update=update)
    except Exception as err:  # the user's forward or loss raised: a finding, not a crash
        return {
            "step": batch.step,
            "loss": math.nan,
            "grad_norm": math.nan,
            "finite": False,
            "exception": f"{type(err).__name__}: {err}",
        }
    scalars = {
        "loss": result.loss.float(),
        "grad_norm": result.grad_norm.float(),
        "param_norm": global_norm([p.detach() for p in model.parameters()]),
    }
    if stats:
        scalars |= _step_stats(session, result.diagnostics, before)
    names = list(scalars)
    values = torch.stack([scalars[n].to(result.loss.device).reshape(()) for n in names]).tolist()
    row = {"step": batch.step, **dict(zip(names, values, strict=True))}
    row["finite"] = all(math.isfinite(row[k]) for k in ("loss", "grad_norm", "param_norm"))
    if probe is not None:
        row["saturation"] = max((s.fraction for s in probe.saturation()), default=0.0)
    return row


def _step_stats(
    session: Session, diagnostics: dict[str, torch.Tensor], before: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"update_ratio": update_ratio(session.model, before)}
    scored = scored_energies(diagnostics)
    if scored is not None:
        out |= energy_stats(scored[0], session.run.manifest.loss.kwargs.get("tau"), scored[1])
    out |= {f"grad_norm/{k}": v for k, v in layer_grad_norms(session.model).items()}
    return out


def state_before(run: Run, step: int, device: torch.device) -> Session:
    """The exact state before ``step``: load the checkpoint at or before it, replay up to it."""
    session = open_session(run, step, device)
    for s in run.require_batches(session.step, step - 1) if step > session.step else []:
        session.train(run.batch(s))
    session.step = step
    return session


def diagnose(run: Run, step: int, device: torch.device, first_loss: float | None = None) -> Fault:
    """Localise the failure at ``step`` from a rebuilt pre-step state; say if it reproduces."""
    fault = localise(state_before(run, step, device), run.batch(step))
    if fault is None:
        return Fault(
            step,
            "unknown",
            "the cheap check failed but the instrumented re-run was finite: "
            "the fault did not reproduce (non-determinism or a transient hardware fault)",
            reproduced=False,
        )
    fault.reproduced = True
    return fault


def _deviation(replayed: float, logged: float) -> float:
    if math.isnan(replayed) and math.isnan(logged):
        return 0.0
    if math.isnan(replayed) or math.isnan(logged):
        return math.inf
    return abs(replayed - logged)
