"""The command line: parse arguments, call an analysis, render. No work happens here."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from energydiag import __version__, render
from energydiag.errors import DiagError
from energydiag.render_json import dumps

app = typer.Typer(
    help="Diagnose NaN and flat-lining losses in energy-model training runs.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

RunArg = Annotated[Path, typer.Argument(help="Run directory (energydiag/1 format).")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a JSON report on stdout instead of tables.")
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (cuda when available).")]


def exits(fn: Callable[..., int]) -> Callable[..., None]:
    """Bad input becomes one line on stderr and exit code 2; results exit 0 (clean) or 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except DiagError as e:
            err.print(f"[red]energydiag: error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        raise typer.Exit(code)

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"energydiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Diagnose NaN and flat-lining losses in energy-model training runs."""


def progress_bar(total: int, disabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[live]}"),
        TimeElapsedColumn(),
        console=err,
        disable=disabled or not err.is_terminal,
        transient=True,
    )


@app.command("replay")
@exits
def replay_cmd(
    run: RunArg = Path("."),
    from_step: Annotated[
        int,
        typer.Option(
            "--from-step", help="Start from the latest checkpoint at or before this step."
        ),
    ] = 0,
    to_step: Annotated[
        int | None,
        typer.Option(
            "--to-step", help="Last step to replay (default: last contiguous logged batch)."
        ),
    ] = None,
    device: DeviceOpt = "cpu",
    every: Annotated[
        int, typer.Option(help="Record full statistics every K steps (0: cheap check only).")
    ] = 10,
    metrics_out: Annotated[
        Path | None,
        typer.Option(
            "--metrics-out", help="Write the per-step table (.csv, or .parquet with pyarrow)."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> int:
    """Re-run the logged training steps from a checkpoint; stop at the first non-finite value and
    localise it (phase, module, op). Exit 1 when a fault is found, 2 on bad input."""
    from energydiag.replay import plan, replay
    from energydiag.run import Run
    from energydiag.session import resolve_device
    from energydiag.table import write_table

    r = Run(run)
    total = len(plan(r, r.checkpoint_at_or_before(from_step), to_step))
    with progress_bar(total, json_out) as bar:
        task = bar.add_task("replay", total=total, live="")

        def tick(row: dict[str, Any]) -> None:
            bar.update(
                task,
                advance=1,
                live=f"step {row['step']} loss {render.fmt(row['loss'])} |g| {render.fmt(row['grad_norm'])}",
            )

        result = replay(r, from_step, to_step, resolve_device(device), every, tick)
    if metrics_out:
        write_table(result.table, metrics_out)
    _emit(result.to_dict(), json_out, lambda d: render.replay(out, d))
    return 1 if result.fault else 0


@app.command("inspect")
@exits
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors checkpoint.")],
    run: Annotated[
        Path | None, typer.Option(help="Run directory (default: the checkpoint's, if any).")
    ] = None,
    batch: Annotated[
        Path | None,
        typer.Option(
            help="A batch file to run the model on (default: the run's batch at the checkpoint's step)."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model factory 'package.module:factory' (default: the run's)."),
    ] = None,
    model_kwargs: Annotated[
        str, typer.Option("--model-kwargs", help="JSON kwargs for --model.")
    ] = "{}",
    tau: Annotated[
        float | None, typer.Option(help="InfoNCE temperature (default: the run's).")
    ] = None,
    device: DeviceOpt = "cpu",
    all_tensors: Annotated[
        bool, typer.Option("--all-tensors", help="List every tensor, not only the flagged ones.")
    ] = False,
    json_out: JsonOpt = False,
) -> int:
    """Per-tensor statistics of a checkpoint and, given a batch, what the energy model does on it:
    energy range, logit spread, loss bounds, saturation, per-layer norms. Exit 1 on an error finding."""
    from energydiag.findings import has_error
    from energydiag.inspect import inspect
    from energydiag.manifest import ModelSpec
    from energydiag.session import resolve_device

    spec = ModelSpec(model, _json_option("--model-kwargs", model_kwargs)) if model else None
    report = inspect(checkpoint, run, batch, spec, tau, resolve_device(device))
    _emit(report.to_dict(), json_out, lambda d: render.inspect(out, d, all_tensors))
    return 1 if has_error(report.findings) else 0


@app.command("bisect")
@exits
def bisect_cmd(
    run: RunArg = Path("."),
    good: Annotated[int | None, typer.Option(help="A checkpoint step known to be good.")] = None,
    bad: Annotated[int | None, typer.Option(help="A checkpoint step known to be bad.")] = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> int:
    """Find the first bad checkpoint in O(log n) evaluations, then replay to the exact first bad
    step and localise it. Unreadable checkpoints are skipped. Exit 1 when a failure is found."""
    from energydiag.bisect import bisect
    from energydiag.run import Run
    from energydiag.session import resolve_device

    r = Run(run)
    with progress_bar(math.ceil(math.log2(max(len(r.checkpoint_steps), 2))) + 1, json_out) as bar:
        task = bar.add_task("bisect", total=None, live="")
        result = bisect(
            r,
            good,
            bad,
            resolve_device(device),
            lambda e: bar.update(task, advance=1, live=f"step {e.step}: {e.status}"),
        )
    _emit(result.to_dict(), json_out, lambda d: render.bisect(out, d))
    return 1 if result.first_bad_checkpoint is not None else 0


@app.command("diagnose")
@exits
def diagnose_cmd(
    run: RunArg = Path("."), device: DeviceOpt = "cpu", json_out: JsonOpt = False
) -> int:
    """One-shot diagnosis: replay and localise a non-finite loss, or inspect the latest checkpoint
    for a stalled one. Exit 1 when something is wrong."""
    from energydiag.diagnose import diagnose
    from energydiag.run import Run
    from energydiag.session import resolve_device

    result = diagnose(Run(run), resolve_device(device))
    _emit(result.to_dict(), json_out, lambda d: render.diagnosis(out, d))
    return 0 if result.verdict == "healthy" else 1


@app.command("demo")
@exits
def demo_cmd(
    fixtures: Annotated[
        Path | None,
        typer.Option(help="Folder of fixture runs (default: the checkout's fixtures/)."),
    ] = None,
    json_out: JsonOpt = False,
) -> int:
    """Diagnose the bundled fixture runs (healthy, stalled, nan) and say what went wrong where."""
    from energydiag.diagnose import diagnose
    from energydiag.run import Run

    folder = fixtures or Path(__file__).resolve().parent.parent / "fixtures"
    runs = (
        sorted(p for p in folder.glob("*") if (p / "run.json").is_file()) if folder.is_dir() else []
    )
    if not runs:
        raise DiagError(
            folder, "no fixture runs here; pass --fixtures DIR (see fixtures/make_fixtures.py)"
        )
    results = [diagnose(Run(p)).to_dict() for p in runs]
    _emit({"runs": results}, json_out, lambda d: [render.diagnosis(out, r) for r in d["runs"]])
    return 0


def _json_option(flag: str, text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DiagError(None, f"{flag}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise DiagError(None, f"{flag}: expected a JSON object")
    return value


def _emit(report: dict[str, Any], as_json: bool, draw: Callable[[dict[str, Any]], None]) -> None:
    """One place that chooses JSON (strict, on stdout) or rich tables."""
    if as_json:
        print(dumps(report))
    else:
        draw(report)


def main() -> None:
    app()
