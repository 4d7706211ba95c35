"""Commands on a run directory: replay, bisect, timeline, diagnose, report, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from energydiag.cli.base import emit, err, progress
from energydiag.cli.options import (
    AgainstOpt,
    BadOpt,
    BitwiseOpt,
    DeviceOpt,
    EveryOpt,
    FixturesOpt,
    ForceOpt,
    FromStepOpt,
    GoodOpt,
    HtmlOpt,
    JsonOpt,
    LadderOpt,
    MetricsOutOpt,
    NprocOpt,
    OtherRunArg,
    PatternOpt,
    PngOpt,
    PredicateOpt,
    ReportOutOpt,
    RunArg,
    StepOpt,
    StepRangeOpt,
    ToStepOpt,
)
from energydiag.errors import OptionError
from energydiag.io.atomic import check_writable, write_text_atomic
from energydiag.report import render
from energydiag.report.console import fmt


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

    Runs the run's own training step (built-in or the run's step function) over the logged batches, restoring each step's RNG state and recorded hyperparameters, and stops at the first NaN/Inf with its phase, module, micro-batch and op. Says how faithful the replay is and what it lacked. A multi-rank run replays on its recorded ranks. Exit 1 when a fault or an error finding is found, 2 on bad input.
    """
    from energydiag.commands import replay
    from energydiag.report.table import write_rows

    if metrics_out:
        check_writable(metrics_out)
    with progress("replay", json_out) as tick:

        def step_done(row: dict[str, Any], planned: int) -> None:
            tick(f"step {row['step']} loss {fmt(row['loss'])} |g| {fmt(row['grad_norm'])}", planned)

        outcome = replay.run(
            run, from_step, to_step, device, every, ladder, nproc, step_done, metrics_out
        )
    if outcome is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    if metrics_out:
        write_rows(outcome.report.steps, metrics_out)
    emit(outcome.report, json_out, render.replay)
    return outcome.code


def bisect_cmd(
    run: RunArg = Path("."),
    good: GoodOpt = None,
    bad: BadOpt = None,
    predicate: PredicateOpt = "any",
    checkpoints: PatternOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> int:
    """Find the first bad step in O(log n) checkpoint evaluations.

    Binary search over checkpoints by --predicate, then a replay from the last good one to the exact step, localised. Unreadable checkpoints are skipped. With --checkpoints, RUN is any folder of foreign checkpoints and only their tensors are judged. Exit 1 when a failure is found.
    """
    from energydiag.commands import bisect

    with progress("bisect", json_out) as tick:
        outcome = bisect.run(
            run,
            good,
            bad,
            predicate,
            checkpoints,
            device,
            lambda e: tick(f"step {e.step}: {e.status}"),
        )
    emit(outcome.report, json_out, render.bisect)
    return outcome.code


def timeline_cmd(
    run: RunArg = Path("."),
    checkpoints: PatternOpt = None,
    png: PngOpt = None,
    json_out: JsonOpt = False,
) -> int:
    """Per-checkpoint weight scale, growth and update ratio: see a run going bad before it is NaN.

    Streams one checkpoint at a time: max|w| and RMS per layer, growth against the first and the previous checkpoint, the update-to-weight ratio between checkpoints, Adam moments and float32 overflow. --png draws max|w| per layer over the steps. Exit 1 when the weights exploded or a checkpoint holds NaN/Inf.
    """
    from energydiag.commands import timeline
    from energydiag.report import plot

    if png:
        check_writable(png)
    with progress("timeline", json_out) as tick:
        outcome = timeline.run(run, checkpoints, lambda step, total: tick(f"step {step}", total))
    if png:
        plot.timeline(outcome.report.to_json(), png)
    emit(outcome.report, json_out, render.timeline)
    return outcome.code


def diagnose_cmd(
    run: RunArg = Path("."), device: DeviceOpt = "cpu", json_out: JsonOpt = False
) -> int:
    """One-shot diagnosis of a run: what went wrong, and where.

    Replays and localises a non-finite loss, or inspects the last healthy checkpoint of a stalled run and reads its curve; names the causes in order and verifies the top remedy by a replay. Exit 1 when something is wrong.
    """
    from energydiag.commands import diagnose

    with progress("diagnose", json_out):  # elapsed time while replays run
        outcome = diagnose.run(run, device)
    emit(outcome.report, json_out, render.diagnosis)
    return outcome.code


def report_cmd(
    run: RunArg = Path("."),
    out_path: ReportOutOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> int:
    """A page to look at: verdict, first fault, findings, loss curve, energy matrix, layers.

    Writes one HTML file with every image inlined (needs the 'plot' extra); --json prints the document the page is drawn from. Exit 1 when the diagnosis finds something wrong.
    """
    from energydiag.analyses.overview import PARTS
    from energydiag.commands import report
    from energydiag.report.html import page

    if out_path is None and not json_out:
        raise OptionError("give a page to write, or ask for JSON", "out", "json")
    if out_path is not None:
        check_writable(out_path)
        if out_path.exists() and not force:
            raise OptionError("already exists; pass this to replace it", "force", path=out_path)
    with progress("report", json_out, total=len(PARTS)) as tick:
        outcome = report.run(run, device, tick)
        if out_path is not None:
            write_text_atomic(out_path, page(outcome.report.to_json()))
    emit(
        outcome.report,
        json_out,
        lambda console, d: console.print(f"wrote {out_path}: {d['diagnosis']['verdict']}"),
    )
    return outcome.code


def demo_cmd(fixtures: FixturesOpt = None, json_out: JsonOpt = False) -> int:
    """Diagnose the bundled fixture runs (healthy, stalled, nan)."""
    from energydiag.commands import diagnose

    def announce(folder: Path) -> None:
        err.print(f"recording the demo runs into {folder} (first use only, about ten seconds)")

    with progress("demo", json_out) as tick:
        outcome = diagnose.demo(fixtures, announce, lambda total: tick("recording", total))
    emit(outcome.report, json_out, render.demo)
    return outcome.code


def diff_cmd(
    run: RunArg,
    other: OtherRunArg = None,
    step: StepOpt = 0,
    steps: StepRangeOpt = None,
    against: AgainstOpt = None,
    bitwise: BitwiseOpt = False,
    html: HtmlOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> int:
    """The first op where two executions of one step part ways, and which side is right.

    Replays the step on both sides watched by module hooks (every module output, the loss, every gradient, the parameters and optimizer state after it, each a float64 norm and sum); where the sides part, that phase is replayed again with every op fingerprinted, the ops are paired by phase, module, op and occurrence, and the first pair whose outputs differ is named: whether its inputs agreed (the divergence was born there) or a parameter differed; that op re-run in float64 on each side's inputs says which side is less accurate. With --against compile[=BACKEND] the module outputs and gradients are all there is (a compiled model cannot be watched op by op), and the first diverging module is re-run in float64. --bitwise fingerprints every op of the step instead of watching. With --steps N..M the sides go on step after step, each from its own state, and the first step that differs at all is reported (every later difference is inherited). Exit 1 when the sides differ beyond reduction-order noise.
    """
    from energydiag.commands import diff
    from energydiag.report.diff_html import page

    if html is not None:
        check_writable(html)
        if html.exists() and not force:
            raise OptionError("already exists; pass this to replace it", "force", path=html)
    with progress("diff", json_out):
        outcome = diff.run(run, other, step, against, device, steps, bitwise)
    if html is not None:
        write_text_atomic(html, page(outcome.report.to_json()))
    emit(outcome.report, json_out, render.diff)
    return outcome.code
