"""Every option and argument of the command line, declared once.

A parameter's name is the argument name of the command it feeds (``from_step`` -> ``--from-step``,
Typer's own derivation), so an error below the CLI that names ``from_step`` is spelled here as
the flag the user typed. Metavars are explicit: `--help` shows ``RUN`` and ``N``, not Python types.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from energydiag.io.check_config import CheckConfig

# --- arguments -----------------------------------------------------------------------------------

RunArg = Annotated[
    Path, typer.Argument(metavar="RUN", help="Run directory (default: the current folder).")
]
CheckpointArg = Annotated[
    Path,
    typer.Argument(
        metavar="CKPT",
        help="A checkpoint: .safetensors, or a torch.save'd state dict (.pt, .pth, .bin, .ckpt: "
        "read with weights_only=True).",
    ),
]
MetricsArg = Annotated[
    Path,
    typer.Argument(
        metavar="LOG",
        help="metrics.jsonl, a CSV (W&B export), TensorBoard events, a W&B run folder, or a run "
        "directory.",
    ),
]
OtherRunArg = Annotated[
    Path | None,
    typer.Argument(metavar="[OTHER]", help="A second run directory to compare with RUN."),
]
SourceArg = Annotated[
    Path, typer.Argument(metavar="DIR", help="Folder holding the foreign checkpoints.")
]

# --- shared by many commands -------------------------------------------------------------------

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a JSON report on stdout instead of tables.")
]
DeviceOpt = Annotated[
    str,
    typer.Option(metavar="DEVICE", help="cpu, cuda, cuda:N, or auto (cuda when available)."),
]
PngOpt = Annotated[
    Path | None,
    typer.Option(metavar="FILE", help="Draw this command's figure here (needs the 'plot' extra)."),
]
HtmlOpt = Annotated[
    Path | None,
    typer.Option(metavar="FILE", help="Also write the comparison as one self-contained HTML page."),
]
StepOpt = Annotated[
    int, typer.Option(metavar="N", help="The step to compare (replayed from a checkpoint).")
]
StepRangeOpt = Annotated[
    str | None,
    typer.Option(
        metavar="N..M",
        help="Compare steps N to M, both sides going on from their own state; the first step "
        "that differs is reported (instead of --step).",
    ),
]
BitwiseOpt = Annotated[
    bool,
    typer.Option(
        "--bitwise",
        help="Also compare a checksum of every bit of each tensor: two values swapped, or a "
        "change the float64 norm and sum cannot resolve, is a difference too.",
    ),
]
AgainstOpt = Annotated[
    str | None,
    typer.Option(
        metavar="VARIANT",
        help="Compare RUN with its own replay under threads=K, dtype=float64|float32|bfloat16|"
        "float16, autocast=bf16|fp16, deterministic=off, device=cpu|cuda|cuda:N (side B there), "
        "compile[=BACKEND] (inductor unless named; both sides then compared at module outputs "
        "and gradients) or ranks=W (W DDP processes on shards of the batch; the gradients "
        "compared).",
    ),
]
FromStepOpt = Annotated[
    int,
    typer.Option(metavar="N", help="Start from the latest checkpoint at or before this step."),
]
RunOpt = Annotated[
    Path | None,
    typer.Option("--run", metavar="RUN", help="Run directory (default: the checkpoint's, if any)."),
]
BatchFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--batch",
        metavar="FILE",
        help="A batch file to run the model on (default: the run's batch at the checkpoint's step).",
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(metavar="PKG.MOD:FN", help="Model factory (default: the run's)."),
]
ModelKwargsOpt = Annotated[
    str, typer.Option(metavar="JSON", help="JSON keyword arguments for the model factory.")
]
TauOpt = Annotated[
    float | None,
    typer.Option(metavar="TAU", help="InfoNCE temperature (default: the run's, if any)."),
]
PatternOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoints",
        metavar="PATTERN",
        help="Foreign checkpoints in a folder: a pattern with a {step} placeholder, e.g. "
        "'*/energy_model--{step}_checkpoint.pt'.",
    ),
]
MetricOpt = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="The loss column: a name or a substring of one (default: an energy loss, else "
        "'loss').",
    ),
]

# --- replay, bisect, timeline, diagnose, report, demo -----------------------------------------------

ToStepOpt = Annotated[
    int | None,
    typer.Option(metavar="N", help="Last step to replay (default: last contiguous logged batch)."),
]
EveryOpt = Annotated[
    int,
    typer.Option(metavar="K", help="Record full statistics every K steps (0: cheap check only)."),
]
MetricsOutOpt = Annotated[
    Path | None,
    typer.Option(metavar="FILE", help="Write the per-step table (.csv, or .parquet with pyarrow)."),
]
LadderOpt = Annotated[
    bool,
    typer.Option(
        "--ladder",
        help="On a fault, re-run the failing step in float32 and float64 too: a precision fault "
        "disappears, a fault in the maths does not.",
    ),
]
NprocOpt = Annotated[
    int | None,
    typer.Option(
        metavar="N",
        help="Processes to replay a multi-rank run with (default: its recorded world size), or "
        "a divisor of it down to 1: each process then plays its share of the recorded ranks in "
        "turn, averaging their gradients as DDP did. They are launched through torch.distributed "
        "(gloo on CPU, NCCL with a GPU per rank); under torchrun, energydiag is one of the ranks.",
    ),
]
GoodOpt = Annotated[int | None, typer.Option(metavar="N", help="A checkpoint step known good.")]
BadOpt = Annotated[int | None, typer.Option(metavar="N", help="A checkpoint step known bad.")]
PredicateOpt = Annotated[
    str,
    typer.Option(
        metavar="WHAT",
        help="What makes a checkpoint bad: nonfinite (NaN/Inf tensors), exploded (a layer grew "
        "×1e3 since the first good checkpoint), loss (non-finite loss on its own batch), or any.",
    ),
]
ReportOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", metavar="FILE", help="Write the HTML page here (one self-contained file)."
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")]
FixturesOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR",
        help="Folder of run directories (default: the checkout's fixtures/; an installed package "
        "records them into its cache on first use, about ten seconds).",
    ),
]

# --- inspect, landscape, curves --------------------------------------------------------------------

LossOpt = Annotated[
    str | None,
    typer.Option(
        metavar="LOSS",
        help="The loss to run: a built-in (inbatch_infonce, infonce_negatives, margin) or "
        "'package.module:fn' (default: the run's, else in-batch InfoNCE at tau 0.5).",
    ),
]
LossKwargsOpt = Annotated[
    str,
    typer.Option(
        metavar="JSON", help="JSON keyword arguments for --loss, e.g. '{\"margin\": 0.5}'."
    ),
]
AllTensorsOpt = Annotated[
    bool, typer.Option("--all-tensors", help="List every tensor, not only the flagged ones.")
]
RefineOpt = Annotated[
    str | None,
    typer.Option(
        metavar="PKG.MOD:FN",
        help="Your refinement, called as fn(model, h, a0, pad_mask) and returning the chain of "
        "actions [a0, a1, …, aT]. Default: gradient steps on the action.",
    ),
]
RefineStepsOpt = Annotated[
    int, typer.Option("--steps", metavar="N", help="Gradient steps of the built-in refiner.")
]
AlphaOpt = Annotated[
    float, typer.Option(metavar="ALPHA", help="Step size of the built-in refiner.")
]
EvalOpt = Annotated[
    bool,
    typer.Option(
        "--eval",
        help="Hand the model to the refiner in eval mode (as inference code that calls "
        "model.eval() does); by default it is handed over in training mode, as training leaves it.",
    ),
]
WindowOpt = Annotated[
    int | None,
    typer.Option(metavar="N", help="Points per analysis window (default: 1/20 of the log)."),
]
BatchSizeOpt = Annotated[
    int | None, typer.Option(metavar="B", help="The batch size B, for the InfoNCE bounds.")
]
EnergySpanOpt = Annotated[
    float | None,
    typer.Option(metavar="SPAN", help="Width of a bounded head's energy range (1 for sigmoid)."),
]

# --- whatif, check ---------------------------------------------------------------------------------

TriesOpt = Annotated[
    list[str],
    typer.Option(
        "--try",
        metavar="VARIANT",
        help="A variant: tau=3, head=softplus, lr*=0.1, lr=1e-4, clip=0.5, clip=none, margin=1, "
        "warmup=10, center=h, batch*=3; join several with commas, repeat for more variants.",
    ),
]
WhatifStepsOpt = Annotated[
    int, typer.Option("--steps", metavar="N", help="How many logged steps each variant replays.")
]
HeadPathOpt = Annotated[
    str | None,
    typer.Option(
        metavar="MODULE",
        help="Module path of the energy output transform that head= swaps (default: the module "
        "holding the bounded head, found by what the model does).",
    ),
]


def _thresholds() -> str:
    """The keys a check config may set, with their defaults, from the config type itself."""
    return ", ".join(f"{f.name} ({f.default:g})" for f in dataclasses.fields(CheckConfig))


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="TOML thresholds (default: [tool.energydiag.check] in ./pyproject.toml). Keys "
        f"(defaults): {_thresholds()}.",
    ),
]
CheckStepsOpt = Annotated[
    int | None,
    typer.Option(
        "--steps", metavar="N", help="Also replay this many logged steps and check fidelity."
    ),
]
BaselineOpt = Annotated[
    Path | None,
    typer.Option(metavar="FILE", help="A previous `check --json` report: fail on regressions."),
]
NumericsBaselineOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="One step's (or a few steps') per-op fingerprints: fail with the first op that "
        "changed since.",
    ),
]
NumericsStepOpt = Annotated[
    str | None,
    typer.Option(
        "--numerics-step",
        metavar="N|N..M",
        help="The step, or steps, --update-baseline fingerprints (default: the first "
        "checkpoint whose batch is logged); the steps from the checkpoint before replay first.",
    ),
]
UpdateBaselineOpt = Annotated[
    bool,
    typer.Option(
        "--update-baseline", help="Write (or replace) the numerics baseline from this run."
    ),
]
JunitOpt = Annotated[
    Path | None, typer.Option(metavar="FILE", help="Write JUnit XML (one test case per check).")
]
JsonFileOpt = Annotated[
    Path | None,
    typer.Option("--json-out", metavar="FILE", help="Write the JSON report to this file."),
]
GithubOpt = Annotated[
    bool,
    typer.Option(
        "--github",
        help="Print GitHub Actions error annotations, and append a Markdown job summary to "
        "$GITHUB_STEP_SUMMARY when it is set.",
    ),
]

# --- convert ---------------------------------------------------------------------------------------

ConvertPatternOpt = Annotated[
    str,
    typer.Option(
        "--checkpoints",
        metavar="PATTERN",
        help="Pattern with a {step} placeholder, e.g. '*/energy_model--{step}_checkpoint.pt'.",
    ),
]
OutDirOpt = Annotated[Path, typer.Option("--out", metavar="DIR", help="Run directory to write.")]
FactoryOpt = Annotated[str, typer.Option("--model", metavar="PKG.MOD:FN", help="Model factory.")]
ForwardKwargsOpt = Annotated[
    str, typer.Option(metavar="JSON", help="JSON keyword arguments for every forward call.")
]
ConvertLossOpt = Annotated[
    str, typer.Option("--loss", metavar="LOSS", help="Built-in loss name or 'package.module:fn'.")
]
MarginOpt = Annotated[float | None, typer.Option(metavar="M", help="Hinge margin (margin loss).")]
OptimizerOpt = Annotated[str, typer.Option(metavar="CLASS", help="torch.optim class name.")]
LrOpt = Annotated[float, typer.Option(metavar="LR", help="Learning rate.")]
GradClipOpt = Annotated[
    float | None, typer.Option(metavar="NORM", help="Max gradient norm (omit for none).")
]
AutocastOpt = Annotated[
    str | None, typer.Option(metavar="DTYPE", help="bfloat16 or float16 when the run autocasts.")
]
BatchStepsOpt = Annotated[
    list[str],
    typer.Option(
        "--batch",
        metavar="STEP=FILE",
        help="A batch (.pt or .safetensors) consumed at STEP; repeatable.",
    ),
]
MetricsLogOpt = Annotated[
    Path | None,
    typer.Option(
        "--metrics", metavar="FILE", help="A metric log (e.g. a W&B CSV) to keep as metrics.jsonl."
    ),
]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace --out if it is not empty.")]


def flag(name: str) -> str:
    """How the command line spells the argument ``name`` (``run_dir`` is the positional RUN)."""
    return {"run_dir": "--run", "tries": "--try", "out_dir": "--out", "eval_mode": "--eval"}.get(
        name, "--" + name.replace("_", "-")
    )
