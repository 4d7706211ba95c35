"""`diff`: the first op where two executions of one step part ways, and which side is right."""

from __future__ import annotations

from pathlib import Path

from energydiag.analyses.diff_variants import parse_variant
from energydiag.analyses.numerics_diff import AGREE, DiffReport, diff_steps
from energydiag.commands import Outcome, step_span
from energydiag.engine.session import resolve_device
from energydiag.errors import OptionError
from energydiag.exitcodes import ExitCode
from energydiag.io.rundir import Run


def run(
    run_a: Path,
    run_b: Path | None,
    step: int,
    against: str | None,
    device: str = "cpu",
    steps: str | None = None,
    bitwise: bool = False,
) -> Outcome[DiffReport]:
    """Two runs (each from its own checkpoint and batches), or one run against a variant of its
    own replay; one step, or a range ``N..M`` up to its first differing step. Exit 1 when the
    sides differ beyond reduction-order noise."""
    if (run_b is None) == (against is None):
        raise OptionError("give a second run, or a variant of this one's replay", "against")
    variant = parse_variant(against) if against else None
    first, last = step_span(steps, "steps") if steps else (step, step)
    runs = Run(run_a), Run(run_b) if run_b else None
    found = diff_steps(*runs, first, last, variant, resolve_device(device), bitwise)
    return Outcome(found, ExitCode.found_if(found.verdict not in AGREE))
