"""Commands on a run directory: replay, bisect, timeline, diagnose, demo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from energydiag.cli.base import (
    DeviceOpt,
    JsonOpt,
    RunArg,
    app,
    emit,
    err,
    exits,
    out,
    progress,
)
from energydiag.errors import DiagError
from energydiag.io.atomic import check_writable
from energydiag.report import render
from energydiag.report.console import fmt

NprocOpt = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        help="Ranks to replay a multi-rank run with (default: its recorded world size). They are "
        "launched through torch.distributed (gloo on CPU, NCCL with a GPU per rank); under "
        "torchrun, energydiag is one of the ranks instead.",
    ),
]
FromStepOpt = Annotated[
    int,
    typer.Option("--from-step", help="Start from the latest checkpoint at or before this step."),
]
ToStepOpt = Annotated[
    int | None,
    typer.Option("--to-step", help="Last step to replay (default: last contiguous logged batch)."),
]
EveryOpt = Annotated[
    int, typer.Option(help="Record full statistics every K steps (0: cheap check only).")
]
MetricsOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--metrics-out", help="Write the per-step table (.csv, or .parquet with pyarrow)."
    ),
]
LadderOpt = Annotated[
    bool,
    typer.Option(
        "--ladder",
        help="On a fault, re-run the failing step in float32 and float64 too: a precision fault disappears, a fault in the maths does not.",
    ),
]
PredicateOpt = Annotated[
    str,
    typer.Option(
        help="What makes a checkpoint bad: nonfinite (NaN/Inf tensors), exploded (a layer grew ×1e3 since the first good checkpoint), loss (non-finite loss on its own batch), or any (the default)."
    ),
]
CheckpointsOpt = Annotated[
    str | None,
    typer.Option(
        help="Checkpoint-only mode on a folder of foreign checkpoints: a pattern with a {step} placeholder, e.g. '*/energy_model--{step}_checkpoint.pt'."
    ),
]
TimelineCheckpointsOpt = Annotated[
    str | None,
    typer.Option(
        help="A folder of foreign checkpoints instead of a run: a pattern with a {step} placeholder."
    ),
]
PngOpt = Annotated[
    Path | None,
    typer.Option(help="Write max|w| per layer over steps (needs the 'plot' extra)."),
]
FixturesOpt = Annotated[
    Path | None,
    typer.Option(
        help="Folder of run directories (default: the checkout's fixtures/; an installed package "
        "records them into its cache on first use, about ten seconds)."
    ),
]


@app.command("replay")
@exits
def replay_cmd(
    run: RunArg = Path("."),
    from_step: FromStepOpt = 0,
    to_step: ToStepOpt = None,
    device: DeviceOpt = "cpu",
    every: EveryOpt = 10,
    metrics_out: MetricsOutOpt = None,
    ladder: LadderOpt = False,
    nproc: NprocOpt = None,
    json_out: JsonOpt = False,
) -> int:
    """Replay logged steps from a checkpoint and localise the first non-finite value.

    Runs the run's own training step (built-in or the run's step function) over the logged batches, restoring each step's RNG state and recorded hyperparameters, and stops at the first NaN/Inf with its phase, module, micro-batch and op. Says how faithful the replay is and what it lacked. Exit 1 when a fault or an error finding is found, 2 on bad input.
    """
    from energydiag.analyses.replaying import replay_report
    from energydiag.engine.session import resolve_device
    from energydiag.findings import has_error
    from energydiag.io.rundir import Run
    from energydiag.report.table import write_table

    if every < 0:
        raise DiagError(None, f"--every {every}: use 0 (cheap check only) or a positive step count")
    if metrics_out:
        check_writable(metrics_out)
    r = Run(run)
    if r.manifest.distributed or (nproc or 1) > 1:
        if ladder or metrics_out:
            raise DiagError(None, "--ladder and --metrics-out work on single-process replays")
        return _replay_ranks(r, from_step, to_step, nproc, device, every, json_out)
    target = resolve_device(device)
    with progress("replay", json_out) as tick:

        def step_done(row: dict[str, Any], planned: int) -> None:
            tick(f"step {row['step']} loss {fmt(row['loss'])} |g| {fmt(row['grad_norm'])}", planned)

        report = replay_report(r, from_step, to_step, target, every, step_done, ladder)
    if metrics_out:
        write_table(report.result.table, metrics_out)
    emit(report.to_dict(), json_out, lambda d: render.replay(out, d))
    return 1 if report.fault or has_error(report.findings) else 0


def _replay_ranks(
    run: Any,
    from_step: int,
    to_step: int | None,
    nproc: int | None,
    device: str,
    every: int,
    json_out: bool,
) -> int:
    """A multi-rank run: launch its ranks, or be one when torchrun started us (rank 0 reports)."""
    from energydiag.analyses.rank_replay import (
        launched_by_torchrun,
        merge,
        rank_worker,
        replay_ranks,
    )

    world = nproc or run.manifest.world_size
    if launched_by_torchrun():
        reports = rank_worker(str(run.root), from_step, to_step, device, every)
        if int(os.environ["RANK"]) != 0:
            return 0
        data = merge(run, reports, None)
    else:
        with progress(f"replay on {world} ranks", json_out) as tick:
            data = replay_ranks(str(run.root), from_step, to_step, world, device, every)
            tick()
    emit(data, json_out, lambda d: render.replay(out, d))
    return 1 if data["fault"] or any(f["severity"] == "error" for f in data["findings"]) else 0


@app.command("bisect")
@exits
def bisect_cmd(
    run: RunArg = Path("."),
    good: Annotated[int | None, typer.Option(help="A checkpoint step known to be good.")] = None,
    bad: Annotated[int | None, typer.Option(help="A checkpoint step known to be bad.")] = None,
    predicate: PredicateOpt = "any",
    checkpoints: CheckpointsOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> int:
    """Find the first bad step in O(log n) checkpoint evaluations.

    Binary search over checkpoints by --predicate, then a replay from the last good one to the exact step, localised. Unreadable checkpoints are skipped. With --checkpoints, RUN is any folder of foreign checkpoints and only their tensors are judged. Exit 1 when a failure is found.
    """
    from energydiag.analyses.bisection import bisect, bisect_checkpoints
    from energydiag.engine.session import resolve_device
    from energydiag.io.rundir import Run
    from energydiag.io.torchfiles import discover

    target = resolve_device(device)
    with progress("bisect", json_out) as tick:

        def evaluated(e: Any) -> None:
            tick(f"step {e.step}: {e.status}")

        if checkpoints:
            paths = discover(run, checkpoints)
            result = bisect_checkpoints(paths, good, bad, evaluated, predicate)
        else:
            result = bisect(Run(run), good, bad, target, evaluated, predicate)
    emit(result.to_dict(), json_out, lambda d: render.bisect(out, d))
    failed = result.first_bad_checkpoint is not None or result.first_logged_failure is not None
    return 1 if failed else 0


@app.command("timeline")
@exits
def timeline_cmd(
    run: RunArg = Path("."),
    checkpoints: TimelineCheckpointsOpt = None,
    png: PngOpt = None,
    json_out: JsonOpt = False,
) -> int:
    """Per-checkpoint weight scale, growth and update ratio: see a run going bad before it is NaN.

    Streams one checkpoint at a time: max|w| and RMS per layer, growth against the first and the previous checkpoint, the update-to-weight ratio between checkpoints, Adam moments and float32 overflow. Exit 1 when the weights exploded or a checkpoint holds NaN/Inf.
    """
    from energydiag.analyses.timeline import timeline
    from energydiag.findings import has_error
    from energydiag.io.rundir import Run
    from energydiag.io.torchfiles import discover
    from energydiag.report import plot

    if png:
        check_writable(png)
    if checkpoints:
        paths, dtype = discover(run, checkpoints), None
    else:
        r = Run(run)
        paths, dtype = r.checkpoint_paths(), r.manifest.autocast_dtype
    with progress("timeline", json_out, len(paths)) as tick:
        result = timeline(paths, dtype, lambda step: tick(f"step {step}"))
    data = result.to_dict()
    if png:
        plot.timeline(data, png)
    emit(data, json_out, lambda d: render.timeline(out, d))
    return 1 if has_error(result.findings) else 0


@app.command("diagnose")
@exits
def diagnose_cmd(
    run: RunArg = Path("."), device: DeviceOpt = "cpu", json_out: JsonOpt = False
) -> int:
    """One-shot diagnosis of a run: what went wrong, and where.

    Replays and localises a non-finite loss, or inspects the latest checkpoint of a stalled run. Exit 1 when something is wrong.
    """
    from energydiag.analyses.diagnosis import diagnose
    from energydiag.engine.session import resolve_device
    from energydiag.io.rundir import Run

    result = diagnose(Run(run), resolve_device(device))
    emit(result.to_dict(), json_out, lambda d: render.diagnosis(out, d))
    return 1 if result.failed else 0


ReportOutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Write the HTML page here (one self-contained file)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")]


@app.command("report")
@exits
def report_cmd(
    run: RunArg = Path("."),
    out_path: ReportOutOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> int:
    """A page to look at: verdict, first fault, findings, loss curve, energy matrix, layers.

    Writes one HTML file with every image inlined (needs the 'plot' extra); --json prints the
    document the page is drawn from. Exit 1 when the diagnosis finds something wrong.
    """
    from energydiag.analyses.overview import PARTS, overview
    from energydiag.engine.session import resolve_device
    from energydiag.io.atomic import write_text_atomic
    from energydiag.io.rundir import Run
    from energydiag.report.html import page
    from energydiag.report.jsonout import jsonable

    if out_path is None and not json_out:
        raise DiagError(None, "give --out report.html, or --json")
    if out_path is not None:
        check_writable(out_path)
        if out_path.exists() and not force:
            raise DiagError(out_path, "already exists; pass --force to replace it")
    with progress("report", json_out, total=len(PARTS)) as tick:
        data = jsonable(overview(Run(run), resolve_device(device), tick))
        if out_path is not None:
            write_text_atomic(out_path, page(data))
    if json_out:
        emit(data, True, lambda d: None)
    else:
        out.print(f"wrote {out_path}: {data['diagnosis']['verdict']}")
    return 1 if data["diagnosis"]["failed"] else 0


@app.command("demo")
@exits
def demo_cmd(
    fixtures: FixturesOpt = None,
    json_out: JsonOpt = False,
) -> int:
    """Diagnose the bundled fixture runs (healthy, stalled, nan)."""
    from energydiag import __version__
    from energydiag.analyses.diagnosis import diagnose_folder
    from energydiag.reference.fixtures import demo_runs

    def announce(folder: Path) -> None:
        err.print(f"recording the demo runs into {folder} (first use only, about ten seconds)")

    folder = fixtures if fixtures is not None else demo_runs(__version__, announce)
    results = [d.to_dict() for d in diagnose_folder(folder)]
    emit({"runs": results}, json_out, lambda d: [render.diagnosis(out, r) for r in d["runs"]])
    return 0
