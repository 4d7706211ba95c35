"""`convert`: foreign checkpoints, batches and a metric log into a run directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from energydiag.commands import Outcome
from energydiag.exitcodes import ExitCode
from energydiag.io.convert import convert, converted_manifest
from energydiag.io.torchfiles import discover
from energydiag.schema import Report, report


@report("convert")
@dataclass
class ConvertReport(Report):
    root: str
    checkpoint_steps: list[int] = field(default_factory=list)
    batch_steps: list[int] = field(default_factory=list)


@dataclass
class Training:
    """What the foreign run trained with, as far as the manifest must say."""

    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "inbatch_infonce"
    loss_kwargs: dict[str, float] = field(default_factory=dict)
    optimizer: str = "AdamW"
    lr: float = 5e-4
    grad_clip: float | None = None
    autocast: str | None = None


def run(
    source: Path,
    checkpoints: str,
    out_dir: Path,
    training: Training,
    batches: dict[int, Path] | None = None,
    metrics: Path | None = None,
    metric: str | None = None,
    overwrite: bool = False,
) -> Outcome[ConvertReport]:
    t = training
    model = (t.model, t.model_kwargs, t.forward_kwargs)
    manifest = converted_manifest(
        source, *model, t.loss, t.loss_kwargs, t.optimizer, t.lr, t.grad_clip, t.autocast
    )
    found = discover(source, checkpoints)
    made = convert(out_dir, found, manifest, batches or {}, metrics, metric, overwrite)
    summary = ConvertReport(str(made.root), made.checkpoint_steps, made.batch_steps)
    return Outcome(summary, ExitCode.OK)
