"""`check`: a CI gate over one run, thresholds from a TOML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from energydiag.analyses.gate import CheckReport, check
from energydiag.commands import Outcome
from energydiag.engine.session import resolve_device
from energydiag.exitcodes import ExitCode
from energydiag.io.check_config import load_config
from energydiag.io.rundir import Run


def run(
    run_dir: Path,
    config: Path | None = None,
    steps: int | None = None,
    baseline: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Outcome[CheckReport]:
    """``baseline`` is a previous check report's JSON: a metric worse than it fails."""
    thresholds = load_config(config)
    found = check(Run(run_dir), thresholds, steps, baseline, resolve_device(device))
    return Outcome(found, ExitCode.found_if(bool(found.failed)))
