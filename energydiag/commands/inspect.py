"""`inspect`: what is in a checkpoint, and what the energy model does on a batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from energydiag.analyses.inspection import InspectReport, inspect
from energydiag.commands import Outcome
from energydiag.engine.session import resolve_device
from energydiag.exitcodes import ExitCode
from energydiag.findings import has_error
from energydiag.io.manifest import LossSpec, ModelSpec


def run(
    checkpoint: Path,
    run_dir: Path | None = None,
    batch: Path | None = None,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tau: float | None = None,
    loss: str | None = None,
    loss_kwargs: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: Callable[[str, int], None] | None = None,
) -> Outcome[InspectReport]:
    """``loss`` is a built-in name or 'package.module:fn'; ``model`` a factory's import string."""
    spec = ModelSpec(model, model_kwargs or {}) if model else None
    chosen = None
    if loss:
        chosen = LossSpec(
            **{("target" if ":" in loss else "name"): loss, "kwargs": loss_kwargs or {}}
        )
    found = inspect(checkpoint, run_dir, batch, spec, tau, resolve_device(device), progress, chosen)
    return Outcome(found, ExitCode.found_if(has_error(found.findings)))
