"""Commands on files: inspect a checkpoint, convert foreign artefacts, analyse a metric log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from energydiag.cli.base import (
    DeviceOpt,
    JsonOpt,
    app,
    emit,
    exits,
    json_object,
    out,
    progress,
    step_file,
)
from energydiag.errors import DiagError
from energydiag.io.atomic import check_writable
from energydiag.report import render

CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="A checkpoint: .safetensors, or a torch.save'd state dict (.pt, .pth, .bin, .ckpt: read with weights_only=True)."
    ),
]
RunOpt = Annotated[
    Path | None, typer.Option(help="Run directory (default: the checkpoint's, if any).")
]
BatchOpt = Annotated[
    Path | None,
    typer.Option(
        help="A batch file to run the model on (default: the run's batch at the checkpoint's step)."
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(help="Model factory 'package.module:factory' (default: the run's)."),
]
ModelKwargsOpt = Annotated[str, typer.Option("--model-kwargs", help="JSON kwargs for --model.")]
TauOpt = Annotated[float | None, typer.Option(help="InfoNCE temperature (default: the run's).")]
LossOpt = Annotated[
    str | None,
    typer.Option(
        help="The loss to run: a built-in (inbatch_infonce, infonce_negatives, margin) or 'package.module:fn' (default: the run's, else in-batch InfoNCE at tau 0.5)."
    ),
]
LossKwargsOpt = Annotated[
    str, typer.Option("--loss-kwargs", help="JSON kwargs for --loss, e.g. '{\"margin\": 0.5}'.")
]
AllTensorsOpt = Annotated[
    bool, typer.Option("--all-tensors", help="List every tensor, not only the flagged ones.")
]
CheckpointsOpt = Annotated[
    str,
    typer.Option(
        help="Pattern with a {step} placeholder, e.g. '*/energy_model--{step}_checkpoint.pt'."
    ),
]
ConvertModelKwargsOpt = Annotated[
    str, typer.Option("--model-kwargs", help="JSON kwargs for the factory.")
]
ForwardKwargsOpt = Annotated[
    str, typer.Option("--forward-kwargs", help="JSON kwargs for every forward call.")
]
ConvertLossOpt = Annotated[str, typer.Option(help="Built-in loss name or 'package.module:fn'.")]
GradClipOpt = Annotated[
    float | None, typer.Option("--grad-clip", help="Max gradient norm (omit for none).")
]
AutocastOpt = Annotated[
    str | None, typer.Option(help="bfloat16 or float16 when the run autocasts.")
]
ConvertBatchOpt = Annotated[
    list[str],
    typer.Option(help="STEP=FILE: a batch (.pt or .safetensors) consumed at STEP; repeatable."),
]
MetricsOpt = Annotated[
    Path | None, typer.Option(help="A metric log (e.g. a W&B CSV) to keep as metrics.jsonl.")
]
MetricOpt = Annotated[
    str | None, typer.Option(help="Which column is the loss (name or substring).")
]
MetricsArg = Annotated[
    Path,
    typer.Argument(
        help="metrics.jsonl, a CSV (W&B export), TensorBoard events, or a run directory."
    ),
]
CurvesMetricOpt = Annotated[
    str | None,
    typer.Option(help="Column name, or a substring of one (default: an energy loss, else 'loss')."),
]
WindowOpt = Annotated[
    int | None, typer.Option(help="Points per analysis window (default: 1/20 of the log).")
]
BatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", help="B, for the InfoNCE bounds.")
]
EnergySpanOpt = Annotated[
    float | None,
    typer.Option("--energy-span", help="Width of a bounded head's energy range (1 for sigmoid)."),
]


@app.command("inspect")
@exits
def inspect_cmd(
    checkpoint: CheckpointArg,
    run: RunOpt = None,
    batch: BatchOpt = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = "{}",
    tau: TauOpt = None,
    loss: LossOpt = None,
    loss_kwargs: LossKwargsOpt = "{}",
    device: DeviceOpt = "cpu",
    all_tensors: AllTensorsOpt = False,
    json_out: JsonOpt = False,
) -> int:
    """Checkpoint statistics and, with a batch, what the energy model does on it.

    Per-tensor NaN/Inf counts and ranges (streamed), then on a batch: energy range, logit spread at tau, the InfoNCE floor and chance, saturation, per-layer activations and gradient norms. Exit 1 on an error finding, 2 on bad input.
    """
    from energydiag.analyses.inspection import inspect
    from energydiag.engine.session import resolve_device
    from energydiag.findings import has_error
    from energydiag.io.manifest import LossSpec, ModelSpec

    spec = ModelSpec(model, json_object(model_kwargs, "--model-kwargs")) if model else None
    kwargs = json_object(loss_kwargs, "--loss-kwargs")
    chosen = None
    if loss:
        chosen = LossSpec(**{("target" if ":" in loss else "name"): loss, "kwargs": kwargs})
    target = resolve_device(device)
    with progress("inspect", json_out) as tick:
        report = inspect(checkpoint, run, batch, spec, tau, target, tick, chosen)
    emit(report.to_dict(), json_out, lambda d: render.inspect(out, d, all_tensors))
    return 1 if has_error(report.findings) else 0


@app.command("convert")
@exits
def convert_cmd(
    source: Annotated[Path, typer.Argument(help="Folder holding the foreign checkpoints.")],
    checkpoints: CheckpointsOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    model: Annotated[str, typer.Option(help="Model factory 'package.module:factory'.")],
    model_kwargs: ConvertModelKwargsOpt = "{}",
    forward_kwargs: ForwardKwargsOpt = "{}",
    loss: ConvertLossOpt = "inbatch_infonce",
    tau: Annotated[float | None, typer.Option(help="InfoNCE temperature.")] = None,
    margin: Annotated[float | None, typer.Option(help="Hinge margin (margin loss).")] = None,
    optimizer: Annotated[str, typer.Option(help="torch.optim class name.")] = "AdamW",
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 5e-4,
    grad_clip: GradClipOpt = None,
    autocast: AutocastOpt = None,
    batch: ConvertBatchOpt = [],  # noqa: B006
    metrics: MetricsOpt = None,
    metric: MetricOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it is not empty.")] = False,
) -> int:
    """Turn foreign .pt checkpoints, batches and a W&B CSV into a run directory.

    So that replay, bisect, inspect, curves and check work on a run recorded without energydiag. Converted checkpoints carry no optimizer state.
    """
    from energydiag.io.convert import convert, converted_manifest
    from energydiag.io.torchfiles import discover

    loss_kwargs = {k: v for k, v in (("tau", tau), ("margin", margin)) if v is not None}
    manifest = converted_manifest(
        source,
        model,
        json_object(model_kwargs, "--model-kwargs"),
        json_object(forward_kwargs, "--forward-kwargs"),
        loss,
        loss_kwargs,
        optimizer,
        lr,
        grad_clip,
        autocast,
    )
    batches = dict(step_file(item) for item in batch)
    found = discover(source, checkpoints)
    result = convert(out_dir, found, manifest, batches, metrics, metric, overwrite)
    out.print(
        f"wrote {result.root}: {len(result.checkpoint_steps)} checkpoint(s), "
        f"{len(result.batch_steps)} batch(es)"
    )
    return 0


@app.command("curves")
@exits
def curves_cmd(
    metrics: MetricsArg,
    metric: CurvesMetricOpt = None,
    window: WindowOpt = None,
    batch_size: BatchSizeOpt = None,
    tau: Annotated[float | None, typer.Option(help="tau, for the InfoNCE bounds.")] = None,
    energy_span: EnergySpanOpt = None,
    png: Annotated[Path | None, typer.Option(help="Write a plot (needs the 'plot' extra).")] = None,
    json_out: JsonOpt = False,
) -> int:
    """Find plateaus, spikes, divergence and NaN in a logged metric.

    Also exact-constant stretches and oscillation, with step ranges; for InfoNCE, places a plateau against chance (log B) and the floor a bounded head allows. Exit 1 on an error finding.
    """
    from energydiag.analyses.curve_sources import curve_report
    from energydiag.findings import has_error
    from energydiag.report import plot

    if png:
        check_writable(png)
    if window is not None and window < 3:
        raise DiagError(None, f"--window {window}: use at least 3 points")
    if batch_size is not None and batch_size < 2:
        raise DiagError(None, f"--batch-size {batch_size}: InfoNCE needs at least 2 candidates")
    result = curve_report(metrics, metric, window, batch_size, tau, energy_span)
    report = result.to_dict()
    if png:
        plot.curve(report, png)
    emit(report, json_out, lambda d: render.curves(out, d))
    return 1 if has_error(result.findings) else 0
