"""`whatif`: the proposed fixes, replayed on the same batches and ranked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from energydiag.analyses.variants import parse_variant
from energydiag.analyses.whatif import WhatifReport, whatif
from energydiag.commands import Outcome
from energydiag.engine.session import resolve_device
from energydiag.errors import OptionError
from energydiag.exitcodes import ExitCode
from energydiag.io.rundir import Run


def run(
    run_dir: Path,
    tries: list[str],
    from_step: int = 0,
    steps: int = 20,
    head_path: str | None = None,
    device: str = "cpu",
    progress: Callable[[str, int], None] | None = None,
) -> Outcome[WhatifReport]:
    """Each of ``tries`` is a variant in the notation of ``analyses.variants``. Exit 1 only when
    the baseline itself fails: a variant that fails is a result."""
    if not tries:
        raise OptionError("give at least one variant (e.g. tau=3 or head=softplus)", "tries")
    variants = [parse_variant(t) for t in tries]
    found = whatif(
        Run(run_dir), from_step, steps, variants, resolve_device(device), head_path, progress
    )
    return Outcome(found, ExitCode.found_if(not found.baseline.finite))
