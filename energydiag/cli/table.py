"""The commands, in the order of the README's table, each with the summary `--help` lists."""

from __future__ import annotations

from collections.abc import Callable

from energydiag.cli import files, gates, runs

COMMANDS: list[tuple[str, str, Callable[..., int]]] = [
    ("demo", "The three bundled runs, diagnosed.", runs.demo_cmd),
    ("diagnose", "What went wrong in a run, and where.", runs.diagnose_cmd),
    ("replay", "Re-run logged steps; localise the first NaN/Inf.", runs.replay_cmd),
    ("bisect", "The first bad checkpoint in O(log n), then the step.", runs.bisect_cmd),
    ("timeline", "Weight scale per layer over the checkpoints.", runs.timeline_cmd),
    ("inspect", "A checkpoint's tensors; the energy model on a batch.", files.inspect_cmd),
    ("curves", "Plateaus, spikes, divergence, NaN in a metric log.", files.curves_cmd),
    ("whatif", "Replay proposed fixes on the same batches, ranked.", gates.whatif_cmd),
    ("check", "A CI gate: thresholds, baseline, JUnit, GitHub.", gates.check_cmd),
    ("convert", "Foreign checkpoints and logs into a run directory.", files.convert_cmd),
    ("landscape", "What inference-time refinement does under the energy.", files.landscape_cmd),
    ("report", "One self-contained HTML page about a run.", runs.report_cmd),
    ("diff", "The first op where two executions of a step part ways.", runs.diff_cmd),
]
