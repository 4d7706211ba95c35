"""`bisect`: the first bad checkpoint in O(log n) evaluations, then the exact step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from energydiag.analyses.bisection import BisectResult, bisect, bisect_checkpoints
from energydiag.analyses.judge import Evaluation
from energydiag.commands import Outcome
from energydiag.engine.session import resolve_device
from energydiag.exitcodes import ExitCode
from energydiag.io.rundir import Run
from energydiag.io.torchfiles import discover


def run(
    run_dir: Path,
    good: int | None = None,
    bad: int | None = None,
    predicate: str = "any",
    checkpoints: str | None = None,
    device: str = "cpu",
    progress: Callable[[Evaluation], None] | None = None,
) -> Outcome[BisectResult]:
    """With ``checkpoints`` (a pattern with a {step} placeholder), ``run_dir`` is any folder of
    foreign checkpoints and only their tensors are judged."""
    target = resolve_device(device)
    if checkpoints:
        paths = discover(run_dir, checkpoints)
        found = bisect_checkpoints(paths, good, bad, progress, predicate)
    else:
        found = bisect(Run(run_dir), good, bad, target, progress, predicate)
    failed = found.first_bad_checkpoint is not None or found.first_logged_failure is not None
    return Outcome(found, ExitCode.found_if(failed))
