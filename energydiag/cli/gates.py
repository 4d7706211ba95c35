"""Commands that weigh fixes and gate CI: whatif and check."""

from __future__ import annotations

import os
from pathlib import Path

from energydiag.cli.base import emit, progress, read_json
from energydiag.cli.options import (
    BaselineOpt,
    CheckStepsOpt,
    ConfigOpt,
    DeviceOpt,
    FromStepOpt,
    GithubOpt,
    HeadPathOpt,
    JsonFileOpt,
    JsonOpt,
    JunitOpt,
    NumericsBaselineOpt,
    NumericsStepOpt,
    PngOpt,
    RunArg,
    TriesOpt,
    UpdateBaselineOpt,
    WhatifStepsOpt,
)
from energydiag.io.atomic import check_writable, write_text_atomic
from energydiag.report import render
from energydiag.report.jsonout import dumps


def whatif_cmd(
    run: RunArg = Path("."),
    from_step: FromStepOpt = 0,
    steps: WhatifStepsOpt = 20,
    tries: TriesOpt = [],  # noqa: B006
    head_path: HeadPathOpt = None,
    device: DeviceOpt = "cpu",
    png: PngOpt = None,
    json_out: JsonOpt = False,
) -> int:
    """Replay the same batches once per proposed fix and rank the fixes.

    Variants change only what they name (tau, margin, head, lr, clip, warm-up, centring, batch size); each reports its loss drop, energy span, logit spread, saturation and the gradient reaching the first layer. A variant that raises or goes non-finite is reported with its message. --png draws the loss per variant. Exit 1 when the baseline itself fails.
    """
    from energydiag.commands import whatif
    from energydiag.report import plot

    if png:
        check_writable(png)
    with progress("what-if", json_out, steps * (len(tries) + 1)) as tick:
        outcome = whatif.run(
            run, tries, from_step, steps, head_path, device, lambda v, s: tick(f"{v} step {s}")
        )
    if png:
        plot.whatif(outcome.report.to_json(), png)
    emit(outcome.report, json_out, render.whatif)
    return outcome.code


def check_cmd(
    run: RunArg = Path("."),
    config: ConfigOpt = None,
    steps: CheckStepsOpt = None,
    baseline: BaselineOpt = None,
    numerics_baseline: NumericsBaselineOpt = None,
    update_baseline: UpdateBaselineOpt = False,
    numerics_step: NumericsStepOpt = None,
    junit: JunitOpt = None,
    json_file: JsonFileOpt = None,
    github: GithubOpt = False,
    png: PngOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> int:
    """Gate CI on a run: exit 0 when every check passes, 1 when one fails.

    Checks: no non-finite values, the loss falls, no long plateau, logit spread, energy span, saturation, gradient norms, weight growth, the recorded schedule, the curve's health, replay fidelity (with --steps), no regression against a baseline, and (with --numerics-baseline) every op of one step, or a few, as it was. --png draws the loss curve (inlined into the --github job summary). Exit 2 on bad input or configuration.
    """
    from energydiag.commands import check
    from energydiag.report import ci as render_ci

    for target in (junit, json_file, png, numerics_baseline if update_baseline else None):
        if target:
            check_writable(target)
    stored = read_json(baseline) if baseline else None
    outcome = check.run(
        run, config, steps, stored, device, numerics_baseline, update_baseline, numerics_step
    )
    data = outcome.report.to_json()
    if junit:
        write_text_atomic(junit, render_ci.junit(data))
    if json_file:
        write_text_atomic(json_file, dumps(data) + "\n")
    if png:
        _draw_curve(run, png)
    if github:
        _github(data, png)
    emit(outcome.report, json_out, render.check)
    return outcome.code


def _draw_curve(run: Path, png: Path) -> None:
    from energydiag.commands import curves
    from energydiag.report import plot

    plot.curve(curves.run(run).report.to_json(), png)


def _github(data: dict, png: Path | None) -> None:
    from energydiag.report import ci as render_ci

    for line in render_ci.github(data):
        print(line)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:  # GitHub's protocol: each step appends its Markdown to this file
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(render_ci.markdown(data, png.read_bytes() if png else None))
