"""`replay`: the recorded steps again, instrumented, to the first non-finite value."""

from __future__ import annotations

import os
from pathlib import Path

from energydiag.analyses.rank_replay import launched_by_torchrun, merge, rank_worker, replay_ranks
from energydiag.analyses.replaying import ReplaySummary, replay_report
from energydiag.commands import Outcome
from energydiag.engine.replay import Progress
from energydiag.engine.session import resolve_device
from energydiag.errors import OptionError
from energydiag.exitcodes import ExitCode
from energydiag.findings import has_error
from energydiag.io.rundir import Run


def run(
    run_dir: Path,
    from_step: int = 0,
    to_step: int | None = None,
    device: str = "cpu",
    every: int = 10,
    ladder: bool = False,
    nproc: int | None = None,
    progress: Progress | None = None,
    metrics_out: Path | None = None,
) -> Outcome[ReplaySummary] | None:
    """None only on a rank other than 0 under torchrun: rank 0 reports for every rank.
    ``metrics_out`` is where the caller will write the per-step rows (one process only)."""
    if every < 0:
        raise OptionError("use 0 (cheap check only) or a positive step count", "every", value=every)
    r = Run(run_dir)
    if r.manifest.distributed or (nproc or 1) > 1:
        single = [
            name for name, given in (("ladder", ladder), ("metrics_out", metrics_out)) if given
        ]
        if single:
            raise OptionError("a multi-rank replay cannot take this option", *single)
        summary = _on_ranks(r, from_step, to_step, nproc, device, every)
    else:
        found = replay_report(
            r, from_step, to_step, resolve_device(device), every, progress, ladder
        )
        summary = found.summary()
    if summary is None:
        return None
    return Outcome(
        summary, ExitCode.found_if(summary.fault is not None or has_error(summary.findings))
    )


def _on_ranks(
    run: Run, from_step: int, to_step: int | None, nproc: int | None, device: str, every: int
) -> ReplaySummary | None:
    """Launch the run's ranks, or be one of them when torchrun started us."""
    if not launched_by_torchrun():
        world = nproc or run.manifest.world_size
        return replay_ranks(str(run.root), from_step, to_step, world, device, every)
    reports = rank_worker(str(run.root), from_step, to_step, device, every)
    return merge(run, reports, None) if int(os.environ["RANK"]) == 0 else None
