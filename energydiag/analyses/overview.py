"""Everything a report page shows about one run, as the JSON the other commands print.

The page is the diagnosis (verdict, first fault, ranked findings), the loss curve with its
bounds and marked segments, the weights and gradient averages over the checkpoints, and the
inspection of the last healthy checkpoint that has a logged batch (energy matrix, saturation). Each
part is the very typed report of its command; a part that cannot be made (no metric log, no
batch) is None with the reason in ``notes``, so the page can say what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from energydiag.analyses.case import Case
from energydiag.analyses.curve_sources import curve_report
from energydiag.analyses.curves import CurveReport
from energydiag.analyses.diagnosis import Diagnosis, diagnose
from energydiag.analyses.inspection import InspectReport
from energydiag.analyses.landscape import LandscapeReport, landscape
from energydiag.analyses.timeline import Timeline, timeline
from energydiag.errors import DiagError
from energydiag.io.layout import checkpoint_path
from energydiag.io.rundir import Run
from energydiag.schema import Report, report

PARTS = ("diagnosis", "curves", "timeline", "inspect", "landscape")


@report("report")
@dataclass
class Overview(Report):
    run: str
    diagnosis: Diagnosis
    curves: CurveReport | None = None
    timeline: Timeline | None = None
    inspect: InspectReport | None = None
    landscape: LandscapeReport | None = None
    notes: list[str] = field(default_factory=list)  # each part that could not be made, and why


def overview(
    run: Run, device: torch.device | None = None, progress: Callable[[str], None] | None = None
) -> Overview:
    """One Case, every part a view of it: the page's diagnosis, timeline and inspection are the
    very objects ``diagnose`` judged, not recomputed their own way."""
    case = Case(run, device)
    makers: dict[str, Callable[[], Any]] = {
        "diagnosis": lambda: diagnose(run, device, case),
        "curves": lambda: curve_report(run.root),
        "timeline": lambda: case.timeline or _no_timeline(run),
        "inspect": lambda: case.inspection or _no_inspection(run),
        "landscape": lambda: _landscape(case),
    }
    parts: dict[str, Any] = {}
    notes: list[str] = []
    for part, make in makers.items():
        if progress:
            progress(part)
        try:
            parts[part] = make()
        except DiagError as err:
            if part == "diagnosis":
                raise
            notes.append(f"{part}: {err}")
    return Overview(str(run.root), notes=[*notes, *case.notes], **parts)


def _no_timeline(run: Run) -> Timeline:
    return timeline(run.checkpoint_paths(), run.manifest.autocast_dtype)  # one checkpoint


def _no_inspection(run: Run) -> None:
    raise DiagError(run.root, "no checkpoint before the failure has a logged batch to run")


def _landscape(case: Case):
    """The built-in refiner on the inspected checkpoint's batch, the model in eval mode: the page
    shows the landscape itself; whether the user's inference forgets eval() is for `landscape`."""
    if case.inspected_step is None:
        _no_inspection(case.run)
    path = checkpoint_path(case.run.root, case.inspected_step)
    return landscape(path, case.run.root, device=case.device, eval_mode=True)
