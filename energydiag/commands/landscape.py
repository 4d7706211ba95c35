"""`landscape`: the energy that inference-time refinement descends, per context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from energydiag.analyses.landscape import LandscapeReport, landscape
from energydiag.commands import Outcome
from energydiag.engine.session import resolve_device
from energydiag.exitcodes import ExitCode
from energydiag.findings import has_error
from energydiag.io.manifest import ModelSpec


def run(
    checkpoint: Path,
    run_dir: Path | None = None,
    batch: Path | None = None,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    refine: str | None = None,
    steps: int = 10,
    alpha: float = 0.2,
    eval_mode: bool = False,
    device: str = "cpu",
) -> Outcome[LandscapeReport]:
    spec = ModelSpec(model, model_kwargs or {}) if model else None
    found = landscape(
        checkpoint, run_dir, batch, spec, refine, steps, alpha, resolve_device(device), eval_mode
    )
    return Outcome(found, ExitCode.found_if(has_error(found.findings)))
