"""Commands that weigh fixes and gate CI: whatif and check."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from energydiag.cli.base import (
    DeviceOpt,
    JsonOpt,
    RunArg,
    app,
    emit,
    exits,
    out,
    progress,
    read_json,
)
from energydiag.errors import DiagError
from energydiag.io.atomic import check_writable, write_text_atomic
from energydiag.report import render
from energydiag.report.jsonout import dumps

FromStepOpt = Annotated[
    int, typer.Option("--from-step", help="Replay from the checkpoint at or before this step.")
]
TriesOpt = Annotated[
    list[str],
    typer.Option(
        "--try",
        help="A variant: tau=3, head=softplus, lr*=0.1, lr=1e-4, clip=0.5, clip=none, margin=1, warmup=10; join several with commas.",
    ),
]
HeadPathOpt = Annotated[
    str | None,
    typer.Option(
        "--head-path",
        help="Module path of the energy output transform that head= swaps (default: the module holding the bounded head, found by what the model does).",
    ),
]
PngOpt = Annotated[
    Path | None,
    typer.Option(help="Write the loss curves per variant (needs the 'plot' extra)."),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(help="TOML thresholds (default: [tool.energydiag.check] in ./pyproject.toml)."),
]
StepsOpt = Annotated[
    int | None, typer.Option(help="Also replay this many logged steps and check fidelity.")
]
BaselineOpt = Annotated[
    Path | None, typer.Option(help="A previous `check --json` report: fail on regressions.")
]
CurvePngOpt = Annotated[
    Path | None,
    typer.Option("--png", help="Draw the loss curve here (and into the --github job summary)."),
]
JunitOpt = Annotated[Path | None, typer.Option(help="Write JUnit XML (one test case per check).")]
JsonFileOpt = Annotated[
    Path | None, typer.Option("--json-out", help="Write the JSON report to this file.")
]
GithubOpt = Annotated[
    bool,
    typer.Option(
        "--github",
        help="Print GitHub Actions error annotations, and append a Markdown job summary to "
        "$GITHUB_STEP_SUMMARY when it is set.",
    ),
]


@app.command("whatif")
@exits
def whatif_cmd(
    run: RunArg = Path("."),
    from_step: FromStepOpt = 0,
    steps: Annotated[int, typer.Option(help="How many logged steps each variant replays.")] = 20,
    tries: TriesOpt = [],  # noqa: B006
    head_path: HeadPathOpt = None,
    device: DeviceOpt = "cpu",
    png: PngOpt = None,
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
    with progress("what-if", json_out, steps * (len(variants) + 1)) as tick:
        report = whatif(
            Run(run),
            from_step,
            steps,
            variants,
            target,
            head_path,
            lambda label, step: tick(f"{label} step {step}"),
        )
    data = report.to_dict()
    if png:
        plot.whatif(data, png)
    emit(data, json_out, lambda d: render.whatif(out, d))
    return 0 if report.baseline.finite else 1


@app.command("check")
@exits
def check_cmd(
    run: RunArg = Path("."),
    config: ConfigOpt = None,
    steps: StepsOpt = None,
    baseline: BaselineOpt = None,
    junit: JunitOpt = None,
    json_file: JsonFileOpt = None,
    github: GithubOpt = False,
    png: CurvePngOpt = None,
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

    for target in (junit, json_file, png):
        if target:
            check_writable(target)
    thresholds = load_config(config)
    stored = read_json(baseline) if baseline else None
    report = check(Run(run), thresholds, steps, stored, resolve_device(device))
    data = report.to_dict()
    if junit:
        write_text_atomic(junit, render_ci.junit(data))
    if json_file:
        write_text_atomic(json_file, dumps(data) + "\n")
    if png:
        from energydiag.analyses.curve_sources import curve_report
        from energydiag.report import plot

        plot.curve(curve_report(Path(run)).to_dict(), png)
    if github:
        for line in render_ci.github(data):
            print(line)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:  # GitHub's protocol: each step appends its Markdown to this file
            with open(summary, "a", encoding="utf-8") as handle:
                handle.write(render_ci.markdown(data, png.read_bytes() if png else None))
    emit(data, json_out, lambda d: render.check(out, d))
    return 1 if report.failed else 0
