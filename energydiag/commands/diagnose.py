"""`diagnose`: one verdict per run, and `demo`: the bundled runs, diagnosed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from energydiag.analyses.diagnosis import Diagnosis, diagnose, diagnose_folder
from energydiag.commands import Outcome
from energydiag.engine.session import resolve_device
from energydiag.exitcodes import ExitCode
from energydiag.io.rundir import Run
from energydiag.schema import Report, report


@report("demo")
@dataclass
class DemoReport(Report):
    runs: list[Diagnosis] = field(default_factory=list)


def run(run_dir: Path, device: str = "cpu") -> Outcome[Diagnosis]:
    result = diagnose(Run(run_dir), resolve_device(device))
    return Outcome(result, ExitCode.found_if(result.failed))


def demo(
    fixtures: Path | None,
    announce: Callable[[Path], None],
    progress: Callable[[int], None] | None = None,
) -> Outcome[DemoReport]:
    """The demo exits 0: its runs are meant to show failures. ``progress(total)`` after each
    step recorded on first use."""
    from energydiag import __version__
    from energydiag.reference.fixtures import demo_runs, recorded_steps

    total = recorded_steps()
    each = (lambda: progress(total)) if progress else None
    folder = fixtures if fixtures is not None else demo_runs(__version__, announce, each)
    return Outcome(DemoReport(diagnose_folder(folder)), ExitCode.OK)
