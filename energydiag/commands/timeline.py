"""`timeline`: weight scale per layer over the checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from energydiag.analyses.timeline import Timeline, timeline
from energydiag.commands import Outcome
from energydiag.exitcodes import ExitCode
from energydiag.findings import has_error
from energydiag.io.alerts import read_alerts
from energydiag.io.rundir import Run
from energydiag.io.torchfiles import discover


def checkpoints_of(run_dir: Path, pattern: str | None) -> tuple[dict[int, Path], str | None, bool]:
    """A run's checkpoints, autocast dtype and whether its monitors alarmed; or a folder's
    foreign checkpoints by ``pattern``."""
    if pattern:
        return discover(run_dir, pattern), None, False
    run = Run(run_dir)
    return run.checkpoint_paths(), run.manifest.autocast_dtype, bool(read_alerts(run.root))


def run(
    run_dir: Path,
    checkpoints: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Outcome[Timeline]:
    """``progress(step, total)`` after each checkpoint, ``total`` the checkpoints to read."""
    paths, dtype, monitored = checkpoints_of(run_dir, checkpoints)
    each = (lambda step: progress(step, len(paths))) if progress else None
    found = timeline(paths, dtype, each, monitored)
    return Outcome(found, ExitCode.found_if(has_error(found.findings)))
