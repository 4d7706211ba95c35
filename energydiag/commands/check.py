"""`check`: a CI gate over one run, thresholds from a TOML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from energydiag.analyses.gate import CheckReport, check
from energydiag.analyses.numerics_baseline import numerics_gate
from energydiag.commands import Outcome, step_span
from energydiag.engine.session import resolve_device
from energydiag.errors import OptionError
from energydiag.exitcodes import ExitCode
from energydiag.io.check_config import load_config
from energydiag.io.rundir import Run


def run(
    run_dir: Path,
    config: Path | None = None,
    steps: int | None = None,
    baseline: dict[str, Any] | None = None,
    device: str = "cpu",
    numerics_baseline: Path | None = None,
    update_baseline: bool = False,
    numerics_step: str | None = None,
) -> Outcome[CheckReport]:
    """``baseline`` is a previous check report's JSON: a metric worse than it fails.
    ``numerics_baseline``: a file of one step's per-op fingerprints, compared op by op (or
    written, of the step or steps ``numerics_step`` names, N or N..M, with
    ``update_baseline``)."""
    if update_baseline and numerics_baseline is None:
        raise OptionError("give the numerics baseline file to write", "update_baseline")
    if numerics_step is not None and not update_baseline:
        problem = "applies when the baseline is written: one is compared at the step it holds"
        raise OptionError(problem, "numerics_step", value=numerics_step)
    span = step_span(numerics_step, "numerics_step") if numerics_step else None
    thresholds, target, run = load_config(config), resolve_device(device), Run(run_dir)
    found = check(run, thresholds, steps, baseline, target)
    if numerics_baseline is not None:
        gate = numerics_gate(run, numerics_baseline, update_baseline, target, span)
        found.checks.append(gate)
    return Outcome(found, ExitCode.found_if(bool(found.failed)))
