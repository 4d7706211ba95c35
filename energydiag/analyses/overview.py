"""Everything a report page shows about one run, as the JSON the other commands print.

The page is the diagnosis (verdict, first fault, ranked findings), the loss curve with its
bounds and marked segments, the weights and gradient averages over the checkpoints, and the
inspection of the latest checkpoint that has a logged batch (energy matrix, saturation). Each
part is the very ``to_dict`` of its command; a part that cannot be made (no metric log, no
batch) is None with the reason in ``notes``, so the page can say what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from energydiag.analyses.curves import curve_report
from energydiag.analyses.diagnosis import diagnose
from energydiag.analyses.inspection import inspect
from energydiag.analyses.timeline import timeline
from energydiag.errors import DiagError
from energydiag.io.layout import checkpoint_path
from energydiag.io.rundir import Run

PARTS = ("diagnosis", "curves", "timeline", "inspect")


def overview(
    run: Run, device: torch.device | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    makers: dict[str, Callable[[], Any]] = {
        "diagnosis": lambda: diagnose(run, device),
        "curves": lambda: curve_report(run.root),
        "timeline": lambda: timeline(run.checkpoint_paths(), run.manifest.autocast_dtype),
        "inspect": lambda: _latest_inspection(run, device),
    }
    result: dict[str, Any] = {"run": str(run.root), "notes": []}
    for part, make in makers.items():
        if progress:
            progress(part)
        try:
            result[part] = make().to_dict()
        except DiagError as err:
            if part == "diagnosis":
                raise
            result[part] = None
            result["notes"].append(f"{part}: {err}")
    return result


def _latest_inspection(run: Run, device: torch.device | None):
    """The latest checkpoint with a batch that the run had not yet failed at: after a failure
    the weights are NaN and there is nothing left to look at."""
    failed = run.first_failure()
    usable = [s for s in run.checkpoints_with_batches if failed is None or s <= failed]
    if not usable:
        raise DiagError(run.root, "no checkpoint before the failure has a logged batch to run")
    return inspect(checkpoint_path(run.root, usable[-1]), run.root, device=device)
