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


def demo(fixtures: Path | None, announce: Callable[[Path], None]) -> Outcome[DemoReport]:
    """The demo exits 0: its runs are meant to show failures."""
    from energydiag import __version__
    from energydiag.reference.fixtures import demo_runs

    folder = fixtures if fixtures is not None else demo_runs(__version__, announce)
    return Outcome(DemoReport(diagnose_folder(folder)), ExitCode.OK)
