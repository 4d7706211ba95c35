"""Turn foreign artefacts (a folder of .pt state dicts, saved batches, a W&B CSV) into an
energydiag/1 run directory, so replay, bisect, inspect, curves and check all work on them.

Foreign checkpoints carry no optimizer state: a replay from one starts the optimizer fresh, so
its losses are not expected to match the original run to the bit (replay says how far they are).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from energydiag.errors import DiagError, OptionError
from energydiag.io.atomic import write_text_atomic
from energydiag.io.layout import MANIFEST, METRICS, batch_path, checkpoint_path
from energydiag.io.manifest import Manifest, parse_manifest
from energydiag.io.metrics import choose_metric, load_metrics, metric_series
from energydiag.io.rundir import Run, load_batch_file
from energydiag.io.state import MODEL_PREFIX
from energydiag.io.tensorfile import write_atomic
from energydiag.io.torchfiles import load_tensor_dict


def convert(
    out: Path,
    checkpoints: dict[int, Path],
    manifest: Manifest,
    batches: dict[int, Path] | None = None,
    metrics: Path | None = None,
    metric: str | None = None,
    overwrite: bool = False,
) -> Run:
    """Build the run in a temporary sibling of ``out`` and move it into place only once it is
    complete: a failure leaves no half-converted run, and an existing one is replaced (with
    ``overwrite``) only after its successor exists."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptionError("exists and is a file; it must be a folder", "out_dir", path=out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OptionError("exists and is not empty; pass this to replace it", "overwrite", path=out)
    if not out.parent.is_dir():
        raise DiagError(out, f"cannot write: folder {out.parent} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _write_run(staging, checkpoints, manifest, batches, metrics, metric)
        _replace(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Run(out)


def _replace(out: Path, staging: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    retired = out.with_name(f".{out.name}.replaced")
    out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)


def _write_run(
    out: Path,
    checkpoints: dict[int, Path],
    manifest: Manifest,
    batches: dict[int, Path] | None,
    metrics: Path | None,
    metric: str | None,
) -> None:
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


def _write_metrics(target: Path, source: Path, metric: str | None) -> None:
    """The chosen column becomes 'loss' at the steps where it was logged."""
    frame = load_metrics(source)
    steps, values = metric_series(frame, choose_metric(frame, metric, source))
    lines = (
        json.dumps({"step": int(step), "loss": float(value)})
        for step, value in zip(steps, values, strict=True)
    )
    write_text_atomic(target, "\n".join(lines) + "\n")


def converted_manifest(
    source: Path,
    model: str,
    model_kwargs: dict,
    forward_kwargs: dict,
    loss: str,
    loss_kwargs: dict,
    optimizer: str,
    lr: float,
    grad_clip: float | None,
    autocast: str | None,
) -> Manifest:
    """The manifest a converted run gets: what the user told us, plus the fact that the
    optimizer state is absent (replays start it fresh, and say so)."""
    raw = {
        "format": "energydiag/1",
        "model": {"target": model, "kwargs": model_kwargs, "forward_kwargs": forward_kwargs},
        "loss": {("target" if ":" in loss else "name"): loss, "kwargs": loss_kwargs},
        "optimizer": {"name": optimizer, "kwargs": {"lr": lr}},
        "grad_clip": grad_clip,
        "autocast_dtype": autocast,
        "seed": None,
        "notes": {
            "converted_from": str(source),
            "optimizer_state": "absent: replays start it fresh",
        },
    }
    return parse_manifest(raw, "convert options")
