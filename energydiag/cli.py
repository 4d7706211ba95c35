"""The command line: parse arguments, call an analysis, render. No work happens here."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from energydiag import __version__
from energydiag.errors import DiagError
from energydiag.io.atomic import check_writable, write_text_atomic
from energydiag.io.layout import parse_step
from energydiag.report import console as render
from energydiag.report.jsonout import dumps

app = typer.Typer(
    help="Diagnose NaN and flat-lining losses in energy-model training runs.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _width() -> int | None:
    """A terminal sets its own width; piped output gets $COLUMNS or 120, not Rich's 80."""
    return None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "120") or 120)


out = Console(width=_width())
err = Console(stderr=True)

RunArg = Annotated[Path, typer.Argument(help="Run directory (energydiag/1 format).")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a JSON report on stdout instead of tables.")
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (cuda when available).")]


def exits(fn: Callable[..., int]) -> Callable[..., None]:
    """Results exit 0 (nothing wrong) or 1 (something wrong). Bad input: one line naming the file
    and the problem, exit 2. A bug of ours: one line, exit 3; ENERGYDIAG_DEBUG=1 shows the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except typer.Exit:
            raise
        except DiagError as e:
            _fail(f"error: {e}", 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as e:
            if os.environ.get("ENERGYDIAG_DEBUG"):
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            _fail(
                f"internal error: {type(e).__name__}: {first} (ENERGYDIAG_DEBUG=1 shows the traceback; "
                "please report it)",
                3,
            )
        raise typer.Exit(code)

    return wrapper


def _fail(message: str, code: int) -> None:
    err.print(f"[red]energydiag:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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


def progress_bar(disabled: bool) -> Progress:
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
    ladder: Annotated[
        bool,
        typer.Option(
            "--ladder",
            help="On a fault, re-run the failing step in float32 and float64 too: a precision fault disappears, a fault in the maths does not.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> int:
    """Replay logged steps from a checkpoint and localise the first non-finite value.

    Runs the run's own training step (built-in or the run's step function) over the logged batches, restoring each step's RNG state and recorded hyperparameters, and stops at the first NaN/Inf with its phase, module, micro-batch and op. Says how faithful the replay is and what it lacked. Exit 1 when a fault or an error finding is found, 2 on bad input.
    """
    from energydiag.analyses.replaying import replay_report
    from energydiag.engine.replay import plan
    from energydiag.engine.session import resolve_device
    from energydiag.findings import has_error
    from energydiag.io.rundir import Run
    from energydiag.report.table import write_table

    if every < 0:
        raise DiagError(None, f"--every {every}: use 0 (cheap check only) or a positive step count")
    if metrics_out:
        check_writable(metrics_out)
    r = Run(run)
    target = resolve_device(device)
    total = len(plan(r, r.checkpoint_at_or_before(from_step), to_step))
    with progress_bar(json_out) as bar:
        task = bar.add_task("replay", total=total, live="")

        def tick(row: dict[str, Any]) -> None:
            bar.update(
                task,
                advance=1,
                live=f"step {row['step']} loss {render.fmt(row['loss'])} |g| {render.fmt(row['grad_norm'])}",
            )

        report = replay_report(r, from_step, to_step, target, every, tick, ladder)
    if metrics_out:
        write_table(report.result.table, metrics_out)
    _emit(report.to_dict(), json_out, lambda d: render.replay(out, d))
    return 1 if report.fault or has_error(report.findings) else 0


@app.command("inspect")
@exits
def inspect_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint: .safetensors, or a torch.save'd state dict (.pt, .pth, .bin, .ckpt: read with weights_only=True)."
        ),
    ],
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
    loss: Annotated[
        str | None,
        typer.Option(
            help="The loss to run: a built-in (inbatch_infonce, infonce_negatives, margin) or 'package.module:fn' (default: the run's, else in-batch InfoNCE at tau 0.5)."
        ),
    ] = None,
    loss_kwargs: Annotated[
        str, typer.Option("--loss-kwargs", help="JSON kwargs for --loss, e.g. '{\"margin\": 0.5}'.")
    ] = "{}",
    device: DeviceOpt = "cpu",
    all_tensors: Annotated[
        bool, typer.Option("--all-tensors", help="List every tensor, not only the flagged ones.")
    ] = False,
    json_out: JsonOpt = False,
) -> int:
    """Checkpoint statistics and, with a batch, what the energy model does on it.

    Per-tensor NaN/Inf counts and ranges (streamed), then on a batch: energy range, logit spread at tau, the InfoNCE floor and chance, saturation, per-layer activations and gradient norms. Exit 1 on an error finding, 2 on bad input.
    """
    from energydiag.analyses.inspection import inspect
    from energydiag.engine.session import resolve_device
    from energydiag.findings import has_error
    from energydiag.io.manifest import LossSpec, ModelSpec

    spec = ModelSpec(model, _json_option("--model-kwargs", model_kwargs)) if model else None
    kwargs = _json_option("--loss-kwargs", loss_kwargs)
    chosen = None
    if loss:
        chosen = LossSpec(**{("target" if ":" in loss else "name"): loss, "kwargs": kwargs})
    target = resolve_device(device)
    with progress_bar(json_out) as bar:
        task = bar.add_task("inspect", total=None, live="")

        def tick(name: str, total: int) -> None:
            bar.update(task, advance=1, total=total, live=name)

        report = inspect(checkpoint, run, batch, spec, tau, target, tick, chosen)
    _emit(report.to_dict(), json_out, lambda d: render.inspect(out, d, all_tensors))
    return 1 if has_error(report.findings) else 0


@app.command("bisect")
@exits
def bisect_cmd(
    run: RunArg = Path("."),
    good: Annotated[int | None, typer.Option(help="A checkpoint step known to be good.")] = None,
    bad: Annotated[int | None, typer.Option(help="A checkpoint step known to be bad.")] = None,
    predicate: Annotated[
        str,
        typer.Option(
            help="What makes a checkpoint bad: nonfinite (NaN/Inf tensors), exploded (a layer grew ×1e3 since the first good checkpoint), loss (non-finite loss on its own batch), or any (the default)."
        ),
    ] = "any",
    checkpoints: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint-only mode on a folder of foreign checkpoints: a pattern with a {step} placeholder, e.g. '*/energy_model--{step}_checkpoint.pt'."
        ),
    ] = None,
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
    with progress_bar(json_out) as bar:
        task = bar.add_task("bisect", total=None, live="")

        def tick(e: Any) -> None:
            bar.update(task, advance=1, live=f"step {e.step}: {e.status}")

        if checkpoints:
            paths = discover(run, checkpoints)
            result = bisect_checkpoints(paths, good, bad, tick, predicate)
        else:
            result = bisect(Run(run), good, bad, target, tick, predicate)
    _emit(result.to_dict(), json_out, lambda d: render.bisect(out, d))
    failed = result.first_bad_checkpoint is not None or result.first_logged_failure is not None
    return 1 if failed else 0


@app.command("timeline")
@exits
def timeline_cmd(
    run: RunArg = Path("."),
    checkpoints: Annotated[
        str | None,
        typer.Option(
            help="A folder of foreign checkpoints instead of a run: a pattern with a {step} placeholder."
        ),
    ] = None,
    png: Annotated[
        Path | None,
        typer.Option(help="Write max|w| per layer over steps (needs the 'plot' extra)."),
    ] = None,
    json_out: JsonOpt = False,
) -> int:
    """Per-checkpoint weight scale, growth and update ratio: see a run going bad before it is NaN.

    Streams one checkpoint at a time: max|w| and RMS per layer, growth against the first and the previous checkpoint, the update-to-weight ratio between checkpoints, Adam moments and float32 overflow. Exit 1 when the weights exploded.
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
    with progress_bar(json_out) as bar:
        task = bar.add_task("timeline", total=len(paths), live="")
        result = timeline(
            paths, dtype, lambda step: bar.update(task, advance=1, live=f"step {step}")
        )
    data = result.to_dict()
    if png:
        plot.timeline(data, png)
    _emit(data, json_out, lambda d: render.timeline(out, d))
    return 1 if has_error(result.findings) else 0


@app.command("convert")
@exits
def convert_cmd(
    source: Annotated[Path, typer.Argument(help="Folder holding the foreign checkpoints.")],
    checkpoints: Annotated[
        str,
        typer.Option(
            help="Pattern with a {step} placeholder, e.g. '*/energy_model--{step}_checkpoint.pt'."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    model: Annotated[str, typer.Option(help="Model factory 'package.module:factory'.")],
    model_kwargs: Annotated[
        str, typer.Option("--model-kwargs", help="JSON kwargs for the factory.")
    ] = "{}",
    forward_kwargs: Annotated[
        str, typer.Option("--forward-kwargs", help="JSON kwargs for every forward call.")
    ] = "{}",
    loss: Annotated[
        str, typer.Option(help="Built-in loss name or 'package.module:fn'.")
    ] = "inbatch_infonce",
    tau: Annotated[float | None, typer.Option(help="InfoNCE temperature.")] = None,
    margin: Annotated[float | None, typer.Option(help="Hinge margin (margin loss).")] = None,
    optimizer: Annotated[str, typer.Option(help="torch.optim class name.")] = "AdamW",
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 5e-4,
    grad_clip: Annotated[
        float | None, typer.Option("--grad-clip", help="Max gradient norm (omit for none).")
    ] = None,
    autocast: Annotated[
        str | None, typer.Option(help="bfloat16 or float16 when the run autocasts.")
    ] = None,
    batch: Annotated[
        list[str],
        typer.Option(help="STEP=FILE: a batch (.pt or .safetensors) consumed at STEP; repeatable."),
    ] = [],  # noqa: B006
    metrics: Annotated[
        Path | None, typer.Option(help="A metric log (e.g. a W&B CSV) to keep as metrics.jsonl.")
    ] = None,
    metric: Annotated[
        str | None, typer.Option(help="Which column is the loss (name or substring).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it is not empty.")] = False,
) -> int:
    """Turn foreign .pt checkpoints, batches and a W&B CSV into a run directory.

    So that replay, bisect, inspect, curves and check work on a run recorded without energydiag. Converted checkpoints carry no optimizer state.
    """
    from energydiag.io.convert import convert
    from energydiag.io.manifest import parse_manifest
    from energydiag.io.torchfiles import discover

    loss_kwargs = {k: v for k, v in (("tau", tau), ("margin", margin)) if v is not None}
    raw = {
        "format": "energydiag/1",
        "model": {
            "target": model,
            "kwargs": _json_option("--model-kwargs", model_kwargs),
            "forward_kwargs": _json_option("--forward-kwargs", forward_kwargs),
        },
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
    batches = dict(_step_file(item) for item in batch)
    result = convert(
        out_dir,
        discover(source, checkpoints),
        parse_manifest(raw, "convert options"),
        batches,
        metrics,
        metric,
        overwrite,
    )
    out.print(
        f"wrote {result.root}: {len(result.checkpoint_steps)} checkpoint(s), "
        f"{len(result.batch_steps)} batch(es)"
    )
    return 0


def _step_file(item: str) -> tuple[int, Path]:
    step, sep, path = item.partition("=")
    parsed = parse_step(step.strip())
    if not sep or parsed is None:
        raise DiagError(None, f"--batch {item!r}: expected STEP=FILE")
    return parsed, Path(path)


@app.command("curves")
@exits
def curves_cmd(
    metrics: Annotated[
        Path,
        typer.Argument(
            help="metrics.jsonl, a CSV (W&B export), TensorBoard events, or a run directory."
        ),
    ],
    metric: Annotated[
        str | None,
        typer.Option(
            help="Column name, or a substring of one (default: an energy loss, else 'loss')."
        ),
    ] = None,
    window: Annotated[
        int | None, typer.Option(help="Points per analysis window (default: 1/20 of the log).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="B, for the InfoNCE bounds.")
    ] = None,
    tau: Annotated[float | None, typer.Option(help="tau, for the InfoNCE bounds.")] = None,
    energy_span: Annotated[
        float | None,
        typer.Option(
            "--energy-span", help="Width of a bounded head's energy range (1 for sigmoid)."
        ),
    ] = None,
    png: Annotated[Path | None, typer.Option(help="Write a plot (needs the 'plot' extra).")] = None,
    json_out: JsonOpt = False,
) -> int:
    """Find plateaus, spikes, divergence and NaN in a logged metric.

    Also exact-constant stretches and oscillation, with step ranges; for InfoNCE, places a plateau against chance (log B) and the floor a bounded head allows. Exit 1 on an error finding.
    """
    from energydiag.analyses.curves import analyse, infonce_curve_bounds, run_bounds, sparkline
    from energydiag.findings import has_error
    from energydiag.io.layout import MANIFEST
    from energydiag.io.metrics import choose_metric, load_metrics
    from energydiag.io.rundir import Run
    from energydiag.report import plot

    frame = load_metrics(metrics)
    column = choose_metric(frame, metric, metrics)
    if batch_size and tau:
        bounds = infonce_curve_bounds(batch_size, tau, energy_span)
    else:
        bounds = run_bounds(Run(metrics)) if (metrics / MANIFEST).is_file() else None
    result = analyse(frame, column, window, bounds)
    report = result.to_dict()
    if png:
        plot.curve(report, png)
    _emit(report, json_out, lambda d: render.curves(out, d, sparkline(d["display"]["value"])))
    return 1 if has_error(result.findings) else 0


@app.command("whatif")
@exits
def whatif_cmd(
    run: RunArg = Path("."),
    from_step: Annotated[
        int, typer.Option("--from-step", help="Replay from the checkpoint at or before this step.")
    ] = 0,
    steps: Annotated[int, typer.Option(help="How many logged steps each variant replays.")] = 20,
    tries: Annotated[
        list[str],
        typer.Option(
            "--try",
            help="A variant: tau=3, head=softplus, lr*=0.1, lr=1e-4, clip=0.5, clip=none, margin=1, warmup=10; join several with commas.",
        ),
    ] = [],  # noqa: B006
    head_path: Annotated[
        str | None,
        typer.Option(
            "--head-path",
            help="Module path of the energy output transform that head= swaps (default: the module holding the bounded head, found by what the model does).",
        ),
    ] = None,
    device: DeviceOpt = "cpu",
    png: Annotated[
        Path | None,
        typer.Option(help="Write the loss curves per variant (needs the 'plot' extra)."),
    ] = None,
    json_out: JsonOpt = False,
) -> int:
    """Replay the same batches once per proposed fix and rank the fixes.

    Variants change only what they name (tau, margin, head, lr, clip, warm-up); each reports its loss drop, energy span, logit spread, saturation and the gradient reaching the first layer. A variant that raises or goes non-finite is reported with its message. Exit 1 when the baseline itself fails.
    """
    from energydiag.analyses.whatif import parse_variant, whatif
    from energydiag.engine.session import resolve_device
    from energydiag.io.rundir import Run
    from energydiag.report import plot

    if not tries:
        raise DiagError(
            None, "give at least one --try variant (e.g. --try tau=3 --try head=softplus)"
        )
    if png:
        check_writable(png)
    variants = [parse_variant(t) for t in tries]
    target = resolve_device(device)
    with progress_bar(json_out) as bar:
        task = bar.add_task("what-if", total=steps * (len(variants) + 1), live="")
        report = whatif(
            Run(run),
            from_step,
            steps,
            variants,
            target,
            head_path,
            lambda label, step: bar.update(task, advance=1, live=f"{label} step {step}"),
        )
    data = report.to_dict()
    if png:
        plot.whatif(data, png)
    _emit(data, json_out, lambda d: render.whatif(out, d))
    return 0 if report.baseline.finite else 1


@app.command("check")
@exits
def check_cmd(
    run: RunArg = Path("."),
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML thresholds (default: \\[tool.energydiag.check] in ./pyproject.toml)."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Also replay this many logged steps and check fidelity.")
    ] = None,
    baseline: Annotated[
        Path | None, typer.Option(help="A previous `check --json` report: fail on regressions.")
    ] = None,
    junit: Annotated[
        Path | None, typer.Option(help="Write JUnit XML (one test case per check).")
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json-out", help="Write the JSON report to this file.")
    ] = None,
    github: Annotated[
        bool, typer.Option("--github", help="Print GitHub Actions error annotations.")
    ] = False,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> int:
    """Gate CI on a run: exit 0 when every check passes, 1 when one fails.

    Checks: no non-finite values, the loss falls, no long plateau, logit spread, energy span, saturation, gradient norms, replay fidelity, and no regression against a baseline. Exit 2 on bad input or configuration.
    """

    from energydiag.analyses.gate import check
    from energydiag.engine.session import resolve_device
    from energydiag.io.check_config import load_config
    from energydiag.io.rundir import Run
    from energydiag.report import ci as render_ci

    for target in (junit, json_file):
        if target:
            check_writable(target)
    thresholds = load_config(config)
    stored = _read_json(baseline) if baseline else None
    report = check(Run(run), thresholds, steps, stored, resolve_device(device))
    data = report.to_dict()
    if junit:
        write_text_atomic(junit, render_ci.junit(data))
    if json_file:
        write_text_atomic(json_file, dumps(data) + "\n")
    if github:
        for line in render_ci.github(data):
            print(line)
    _emit(data, json_out, lambda d: render.check(out, d))
    return 1 if report.failed else 0


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DiagError(path, "file not found")
    return _json_object(path.read_text(), path)


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
    """Diagnose the bundled fixture runs (healthy, stalled, nan)."""
    from energydiag.analyses.diagnosis import diagnose
    from energydiag.io.rundir import Run

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
    return _json_object(text, flag)


def _json_object(text: str, source: str | Path) -> dict[str, Any]:
    """A JSON object from an option or a file; anything else is a one-line error naming it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DiagError(source, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise DiagError(source, "expected a JSON object")
    return value


def _emit(report: dict[str, Any], as_json: bool, draw: Callable[[dict[str, Any]], None]) -> None:
    """One place that chooses JSON (strict, on stdout) or rich tables."""
    if as_json:
        print(dumps(report))
    else:
        draw(report)


def legacy_check_json(argv: list[str]) -> list[str]:
    """`check RUN --json FILE` (0.1) still works for one release: it means --json-out FILE."""
    if "check" not in argv or "--json" not in argv:
        return argv
    i = argv.index("--json")
    follows = argv[i + 1] if i + 1 < len(argv) else ""
    if follows.endswith(".json") and not follows.startswith("-"):
        err.print(
            "[yellow]energydiag:[/yellow] `check --json FILE` is deprecated: use --json-out FILE "
            "(--json now prints the report)",
            highlight=False,
        )
        return [*argv[:i], "--json-out", *argv[i + 1 :]]
    return argv


def main() -> None:
    try:
        app(args=legacy_check_json(sys.argv[1:]), prog_name="energydiag")
    except KeyboardInterrupt:
        err.print("[red]energydiag:[/red] interrupted", highlight=False)
        raise SystemExit(130) from None
