"""One namespace for the terminal views the CLI calls: ``render.replay(console, report)``."""

from energydiag.report.diff_view import diff
from energydiag.report.file_views import curves, inspect
from energydiag.report.gate_views import check, whatif
from energydiag.report.landscape_view import landscape
from energydiag.report.run_views import bisect, converted, demo, diagnosis, replay, timeline

__all__ = [
    "bisect",
    "check",
    "converted",
    "curves",
    "demo",
    "diff",
    "diagnosis",
    "inspect",
    "landscape",
    "replay",
    "timeline",
    "whatif",
]
