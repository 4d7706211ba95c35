"""`report`: everything a report page shows about one run, from one Case."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from energydiag.analyses.overview import Overview, overview
from energydiag.commands import Outcome
from energydiag.engine.session import resolve_device
from energydiag.exitcodes import ExitCode
from energydiag.io.rundir import Run


def run(
    run_dir: Path, device: str = "cpu", progress: Callable[[str], None] | None = None
) -> Outcome[Overview]:
    found = overview(Run(run_dir), resolve_device(device), progress)
    return Outcome(found, ExitCode.found_if(found.diagnosis.failed))
