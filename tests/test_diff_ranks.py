"""`diff --against ranks=W` (issue 23, Done-when case 5): the step on W DDP processes (gloo),
each rank a W-th of the global batch, against one process on the whole batch. The ranks'
forwards see shards, so what is compared is what the step leaves: its gradients (DDP's
all-reduce averages them), the mean of the ranks' losses and the parameters after."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES
from handloop import train
from typer.testing import CliRunner

from energydiag.cli import app

STEP = 5  # a checkpoint of the runs below
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs, no dropout (each rank would draw its own mask): one whose InfoNCE gathers
    every rank's actions as candidates, one whose candidates stay on each rank."""
    root = tmp_path_factory.mktemp("ranks")
    for loss in ("gathered_infonce", "inbatch_infonce"):
        spec = {"name": loss, "kwargs": {"tau": 0.5}}
        train(root / loss, steps=6, checkpoint_every=5, model_kwargs={"dropout": 0.0}, loss=spec)
    return root


def diff(run, *args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["diff", str(run), *args, "--json"])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}


def test_two_ranks_part_from_one_process_at_the_gradient_reduction_by_reordering(runs):
    code, report = diff(runs / "gathered_infonce", "--step", str(STEP), "--against", "ranks=2")
    first = report["first_divergence"]
    assert code == 0 and report["verdict"] == "reduction-order noise"
    assert report["level"] == "gradient" and report["unmatched"] == [0, 0]
    assert report["ops"][0] == report["aligned"] > 20  # every parameter's gradient
    assert first["phase"] == "backward" and first["op"].startswith("grad ")
    assert 0 < report["gradient_gap"] < report["noise_bound"] == 1e-4
    assert report["loss"][1] == pytest.approx(report["loss"][0], rel=1e-6)


def test_a_loss_whose_negatives_stay_on_each_rank_is_a_semantic_difference(runs):
    """Each rank's positives meet B/W - 1 negatives instead of B - 1: a different loss (its
    chance level falls from log 8 to log 4), not a rounding."""
    code, report = diff(runs / "inbatch_infonce", "--step", str(STEP), "--against", "ranks=2")
    assert code == 1 and report["verdict"] == "semantic difference"
    assert report["gradient_gap"] > 0.1
    assert report["loss"][1] < report["loss"][0] - 0.3


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--step", "40", "--against", "ranks=3"], "a batch of 8 does not split into 3"),
        (["--steps", "40..41", "--against", "ranks=2"], "compares one step, not a range"),
        (["--step", "40", "--against", "ranks=2", "--bitwise"], "by norm and sum only"),
        (["--step", "40", "--against", "ranks=1"], "use threads=K"),
    ],
)
def test_what_ranks_cannot_do_is_one_line_before_any_process_starts(args, problem):
    result = runner.invoke(app, ["diff", str(FIXTURES / "healthy"), *args])
    assert result.exit_code == 2 and problem in result.output and "Traceback" not in result.output
