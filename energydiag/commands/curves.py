"""`curves`: plateaus, spikes, divergence and NaN in a logged metric."""

from __future__ import annotations

from pathlib import Path

from energydiag.analyses.curve_sources import curve_report
from energydiag.analyses.curves import CurveReport
from energydiag.commands import Outcome
from energydiag.errors import OptionError
from energydiag.exitcodes import ExitCode
from energydiag.findings import has_error


def run(
    metrics: Path,
    metric: str | None = None,
    window: int | None = None,
    batch_size: int | None = None,
    tau: float | None = None,
    energy_span: float | None = None,
) -> Outcome[CurveReport]:
    if window is not None and window < 3:
        raise OptionError("use at least 3 points", "window", value=window)
    if batch_size is not None and batch_size < 2:
        raise OptionError("InfoNCE needs at least 2 candidates", "batch_size", value=batch_size)
    found = curve_report(metrics, metric, window, batch_size, tau, energy_span)
    return Outcome(found, ExitCode.found_if(has_error(found.findings)))
