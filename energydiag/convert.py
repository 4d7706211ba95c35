"""Turn foreign artefacts (a folder of .pt state dicts, saved batches, a W&B CSV) into an
energydiag/1 run directory, so replay, bisect, inspect, curves and check all work on them.

Foreign checkpoints carry no optimizer state: a replay from one starts the optimizer fresh, so
its losses are not expected to match the original run to the bit (replay says how far they are).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from energydiag.errors import DiagError
from energydiag.foreign import load_tensor_dict
from energydiag.layout import MANIFEST, METRICS, batch_path, checkpoint_path
from energydiag.manifest import Manifest
from energydiag.metrics_io import choose_metric, load_metrics, metric_series
from energydiag.run import Run, load_batch_file
from energydiag.state import MODEL_PREFIX
from energydiag.tensorfile import write_atomic, write_text_atomic


def convert(
    out: Path,
    checkpoints: dict[int, Path],
    manifest: Manifest,
    batches: dict[int, Path] | None = None,
    metrics: Path | None = None,
    metric: str | None = None,
    overwrite: bool = False,
) -> Run:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DiagError(out, "exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    write_text_atomic(out / MANIFEST, manifest.to_json())
    for step, source in checkpoints.items():
        tensors = {MODEL_PREFIX + k: v for k, v in load_tensor_dict(source).items()}
        write_atomic(
            checkpoint_path(out, step),
            tensors,
            {"kind": "checkpoint", "step": str(step), "source": str(source)},
        )
    for step, source in (batches or {}).items():
        batch = load_batch_file(source, step)
        write_atomic(
            batch_path(out, step), batch.tensors | batch.rng, {"kind": "batch", "step": str(step)}
        )
    if metrics is not None:
        _write_metrics(out / METRICS, metrics, metric)
    return Run(out)


def _write_metrics(target: Path, source: Path, metric: str | None) -> None:
    """The chosen column becomes 'loss' at the steps where it was logged."""
    frame = load_metrics(source)
    steps, values = metric_series(frame, choose_metric(frame, metric, source))
    lines = (
        json.dumps({"step": int(step), "loss": float(value)})
        for step, value in zip(steps, values, strict=True)
    )
    write_text_atomic(target, "\n".join(lines) + "\n")
