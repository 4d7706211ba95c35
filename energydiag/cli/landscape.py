"""`energydiag landscape`: the energy the policy descends at inference, per context."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from energydiag.cli.base import DeviceOpt, JsonOpt, app, emit, exits, json_object, out, progress
from energydiag.cli.files import BatchOpt, CheckpointArg, ModelKwargsOpt, ModelOpt, RunOpt
from energydiag.io.atomic import check_writable
from energydiag.report import render

RefineOpt = Annotated[
    str | None,
    typer.Option(
        "--refine",
        help="Your refinement 'package.module:fn', called as fn(model, h, a0, pad_mask) and returning the chain of actions [a0, a1, …, aT]. Default: gradient steps on the action.",
    ),
]
StepsOpt = Annotated[int, typer.Option("--steps", help="Gradient steps of the built-in refiner.")]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="Step size of the built-in refiner.")]


@app.command("landscape")
@exits
def landscape_cmd(
    checkpoint: CheckpointArg,
    run: RunOpt = None,
    batch: BatchOpt = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = "{}",
    refine: RefineOpt = None,
    steps: StepsOpt = 10,
    alpha: AlphaOpt = 0.2,
    eval_mode: Annotated[
        bool,
        typer.Option(
            "--eval",
            help="Hand the model to the refiner in eval mode (as inference code that calls model.eval() does); by default it is handed over in training mode, as training leaves it.",
        ),
    ] = False,
    device: DeviceOpt = "cpu",
    png: Annotated[
        Path | None,
        typer.Option(
            help="Draw the energy along each chain and straight path (needs the 'plot' extra)."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> int:
    """Refine actions under the energy and check the descent: train/eval state, rising steps, basins.

    Per context of the batch: dropout or batch-norm live during refinement (with the energy change it causes), the share of steps where the energy rises (and the largest stable step size, by halving), the straight path from start to end, and the refined action against the demonstration. Exit 1 on an error finding.
    """
    from energydiag.analyses.landscape import landscape
    from energydiag.engine.session import resolve_device
    from energydiag.findings import has_error
    from energydiag.io.manifest import ModelSpec
    from energydiag.report import plot

    if png:
        check_writable(png)
    spec = ModelSpec(model, json_object(model_kwargs, "--model-kwargs")) if model else None
    with progress("landscape", json_out):
        report = landscape(
            checkpoint, run, batch, spec, refine, steps, alpha, resolve_device(device), eval_mode
        )
    data = report.to_dict()
    if png:
        plot.landscape(data, png)
    emit(data, json_out, lambda d: render.landscape(out, d))
    return 1 if has_error(report.findings) else 0
