"""Where a curve comes from and which bounds it is judged against: a metric log, a run directory
(whose loss, batches and head give chance and the floor), or the options a user states.

A log file is read and judged without importing torch: on a 10-million-row log its 220 MiB
would be a third of the memory budget. Only a run directory loads the run's own module."""

from __future__ import annotations

import math
from pathlib import Path

from energydiag.analyses.curves import CurveReport, analyse
from energydiag.analyses.early_warning import with_alarms
from energydiag.contrastive.bounds import infonce_curve_bounds
from energydiag.errors import OptionError
from energydiag.io.layout import MANIFEST
from energydiag.io.metrics import choose_metric, load_metrics


def curve_report(
    source: Path,
    metric: str | None = None,
    window: int | None = None,
    batch_size: int | None = None,
    tau: float | None = None,
    energy_span: float | None = None,
) -> CurveReport:
    """Analyse one metric of a log; InfoNCE bounds from the options, else from the run."""
    source = Path(source)
    frame = load_metrics(source)
    column = choose_metric(frame, metric, source)
    if tau is not None and tau <= 0:
        raise OptionError("the temperature must be positive", "tau", value=tau)
    bounds = None
    if batch_size and tau:
        bounds = infonce_curve_bounds(batch_size, tau, energy_span)
    elif batch_size:  # chance is log B whatever tau is; only the floor needs tau
        bounds = {"chance": math.log(batch_size), "batch_size": batch_size}
    if not (source / MANIFEST).is_file():
        return with_alarms(analyse(frame, column, window, bounds), frame)
    from energydiag.analyses.run_curves import run_bounds, with_ranks
    from energydiag.io.rundir import Run

    run = Run(source)
    bounds = run_bounds(run) if bounds is None else bounds
    return with_ranks(with_alarms(analyse(frame, column, window, bounds), frame), run)
