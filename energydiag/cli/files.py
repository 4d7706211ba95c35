"""Commands on files: inspect a checkpoint, convert foreign artefacts, analyse a metric log,
and the energy landscape of a checkpoint."""

from __future__ import annotations

import functools

from energydiag.cli.base import emit, json_object, progress, step_file
from energydiag.cli.options import (
    AllTensorsOpt,
    AlphaOpt,
    AutocastOpt,
    BatchFileOpt,
    BatchSizeOpt,
    BatchStepsOpt,
    CheckpointArg,
    ConvertLossOpt,
    ConvertPatternOpt,
    DeviceOpt,
    EnergySpanOpt,
    EvalOpt,
    FactoryOpt,
    ForwardKwargsOpt,
    GradClipOpt,
    JsonOpt,
    LossKwargsOpt,
    LossOpt,
    LrOpt,
    MarginOpt,
    MetricOpt,
    MetricsArg,
    MetricsLogOpt,
    ModelKwargsOpt,
    ModelOpt,
    OptimizerOpt,
    OutDirOpt,
    OverwriteOpt,
    PngOpt,
    RefineOpt,
    RefineStepsOpt,
    RunOpt,
    SourceArg,
    TauOpt,
    WindowOpt,
)
from energydiag.io.atomic import check_writable
from energydiag.report import render


def inspect_cmd(
    checkpoint: CheckpointArg,
    run: RunOpt = None,
    batch: BatchFileOpt = None,
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

    Per-tensor NaN/Inf counts and ranges (streamed), then on a batch: energy range, logit spread at tau, the InfoNCE floor and chance, saturation, per-layer activations and gradient norms, and the training-time checks of the energy-model doctor. Exit 1 on an error finding, 2 on bad input.
    """
    from energydiag.commands import inspect

    with progress("inspect", json_out) as tick:
        outcome = inspect.run(
            checkpoint,
            run,
            batch,
            model,
            json_object(model_kwargs, "--model-kwargs"),
            tau,
            loss,
            json_object(loss_kwargs, "--loss-kwargs"),
            device,
            tick,
        )
    emit(outcome.report, json_out, functools.partial(render.inspect, all_tensors=all_tensors))
    return outcome.code


def convert_cmd(
    source: SourceArg,
    checkpoints: ConvertPatternOpt,
    out_dir: OutDirOpt,
    model: FactoryOpt,
    model_kwargs: ModelKwargsOpt = "{}",
    forward_kwargs: ForwardKwargsOpt = "{}",
    loss: ConvertLossOpt = "inbatch_infonce",
    tau: TauOpt = None,
    margin: MarginOpt = None,
    optimizer: OptimizerOpt = "AdamW",
    lr: LrOpt = 5e-4,
    grad_clip: GradClipOpt = None,
    autocast: AutocastOpt = None,
    batch: BatchStepsOpt = [],  # noqa: B006
    metrics: MetricsLogOpt = None,
    metric: MetricOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> int:
    """Turn foreign .pt checkpoints, batches and a W&B CSV into a run directory.

    So that replay, bisect, inspect, curves and check work on a run recorded without energydiag. Converted checkpoints carry no optimizer state.
    """
    from energydiag.commands.convert import Training, run

    training = Training(
        model,
        json_object(model_kwargs, "--model-kwargs"),
        json_object(forward_kwargs, "--forward-kwargs"),
        loss,
        {k: v for k, v in (("tau", tau), ("margin", margin)) if v is not None},
        optimizer,
        lr,
        grad_clip,
        autocast,
    )
    batches = dict(step_file(item) for item in batch)
    outcome = run(source, checkpoints, out_dir, training, batches, metrics, metric, overwrite)
    emit(outcome.report, json_out, render.converted)
    return outcome.code


def curves_cmd(
    metrics: MetricsArg,
    metric: MetricOpt = None,
    window: WindowOpt = None,
    batch_size: BatchSizeOpt = None,
    tau: TauOpt = None,
    energy_span: EnergySpanOpt = None,
    png: PngOpt = None,
    json_out: JsonOpt = False,
) -> int:
    """Find plateaus, spikes, divergence and NaN in a logged metric.

    Also exact-constant stretches and oscillation, with step ranges; for InfoNCE, places a plateau against chance (log B) and the floor a bounded head allows. --png draws the curve with its bounds and marked segments. Exit 1 on an error finding.
    """
    from energydiag.commands import curves
    from energydiag.report import plot

    if png:
        check_writable(png)
    with progress("curves", json_out):  # elapsed time while a long log is read
        outcome = curves.run(metrics, metric, window, batch_size, tau, energy_span)
    if png:
        plot.curve(outcome.report.to_json(), png)
    emit(outcome.report, json_out, render.curves)
    return outcome.code


def landscape_cmd(
    checkpoint: CheckpointArg,
    run: RunOpt = None,
    batch: BatchFileOpt = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = "{}",
    refine: RefineOpt = None,
    steps: RefineStepsOpt = 10,
    alpha: AlphaOpt = 0.2,
    eval_mode: EvalOpt = False,
    device: DeviceOpt = "cpu",
    png: PngOpt = None,
    json_out: JsonOpt = False,
) -> int:
    """Refine actions under the energy and check the descent: train/eval state, rising steps, basins.

    Per context of the batch: dropout or batch-norm live during refinement (with the energy change it causes), the share of steps where the energy rises (and the largest stable step size, by halving), the straight path from start to end, and the refined action against the demonstration. --png draws the energy along each chain. Exit 1 on an error finding.
    """
    from energydiag.commands import landscape
    from energydiag.report import plot

    if png:
        check_writable(png)
    kwargs = json_object(model_kwargs, "--model-kwargs")
    with progress("landscape", json_out):
        outcome = landscape.run(
            checkpoint, run, batch, model, kwargs, refine, steps, alpha, eval_mode, device
        )
    if png:
        plot.landscape(outcome.report.to_json(), png)
    emit(outcome.report, json_out, render.landscape)
    return outcome.code
