"""`check --numerics-baseline` (issue 23): a step's (or a few steps') per-op fingerprints kept as
a CI baseline, the first op a later commit changed, and the files it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from diffruns import edited_copy, one_ulp_up, perturbed_copy, split_copy
from typer.testing import CliRunner

from energydiag.cli import app
from energydiag.engine.reductions import METHOD

runner = CliRunner()


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    """A copy of the healthy fixture (the baselines are written beside it, never into it)."""
    root = tmp_path_factory.mktemp("baseline") / "healthy"
    shutil.copytree(FIXTURES / "healthy", root)
    return root


def test_the_numerics_baseline_holds_run_after_run_and_names_the_changed_op(healthy, tmp_path):
    """Written once; 10 comparisons in this process and one in a fresh one pass (backward ops
    are keyed without their module, whose attribution varies between processes); the run with
    one ulp changed in the baseline step's checkpoint fails at that weight's first reader."""
    import subprocess
    import sys

    from energydiag.analyses.numerics_baseline import numerics_gate
    from energydiag.io.rundir import Run

    baseline = tmp_path / "numerics.json"
    base = ["check", str(healthy), "--numerics-baseline", str(baseline)]
    assert runner.invoke(app, base).exit_code == 2  # no baseline yet: nothing is written
    assert not baseline.exists()
    assert runner.invoke(app, [*base, "--update-baseline"]).exit_code == 0
    stored = json.loads(baseline.read_text())
    assert stored["type"] == "numerics-baseline" and len(stored["ops"]) > 300
    run = Run(healthy)
    verdicts = [numerics_gate(run, baseline, False, torch.device("cpu")) for _ in range(10)]
    assert {v.status for v in verdicts} == {"passed"}
    fresh = [str(Path(sys.executable).with_name("energydiag")), *base, "--json"]
    done = subprocess.run(fresh, capture_output=True, text=True, check=False)
    (numerics,) = [c for c in json.loads(done.stdout)["checks"] if c["name"] == "numerics"]
    assert numerics["status"] == "passed", numerics["message"]
    changed = perturbed_copy(tmp_path / "changed", healthy, stored["step"])
    result = runner.invoke(app, ["check", str(changed), "--numerics-baseline", str(baseline)])
    assert result.exit_code == 1
    failed = numerics_gate(Run(changed), baseline, False, torch.device("cpu"))
    assert failed.status == "failed" and failed.evidence["first_changed"]["module"] == "act_in"
    assert "aten::addmm in 'act_in' (forward, occurrence 1) moved by" in failed.message


def test_a_baseline_of_chosen_steps_replays_them_from_the_checkpoint_before(healthy, tmp_path):
    """--numerics-step 41..43 (no checkpoint at 41): written from checkpoint 40 with step 40
    replayed first, then compared at the steps the file holds, step after step; one ulp in
    step 43's batch fails at step 43 with the first op that reads it. Asked of a comparison,
    or of steps without their batches, --numerics-step is one line."""
    baseline = tmp_path / "numerics.json"
    base = ["check", str(healthy), "--numerics-baseline", str(baseline)]
    wrong = runner.invoke(app, [*base, "--numerics-step", "41"])
    assert (
        wrong.exit_code == 2 and "--numerics-step 41: applies when the baseline is" in wrong.output
    )
    assert not baseline.exists()
    written = runner.invoke(app, [*base, "--update-baseline", "--numerics-step", "41..43"])
    assert written.exit_code == 0 and "ops of steps 41..43" in written.stdout
    stored = json.loads(baseline.read_text())
    assert stored["step"] == 41 and [s["step"] for s in stored["later"]] == [42, 43]
    assert numerics_check(base)["evidence"]["steps"] == [41, 43]
    batch = "batches/step-00000043.safetensors"
    changed = edited_copy(tmp_path / "changed", healthy, batch, "h", one_ulp_up)
    failed = numerics_check(["check", str(changed), "--numerics-baseline", str(baseline)])
    assert failed["status"] == "failed" and failed["evidence"]["step"] == 43
    assert failed["message"].startswith("step 43: aten::")
    for span, problem in [("400", "missing batches for steps 160-400"), ("43..41", "N <= M")]:
        refused = runner.invoke(app, [*base, "--update-baseline", "--numerics-step", span])
        assert refused.exit_code == 2 and problem in refused.output
        assert len(refused.output.strip().splitlines()) == 1


def numerics_check(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    (numerics,) = [c for c in json.loads(result.stdout)["checks"] if c["name"] == "numerics"]
    return numerics


def test_a_baseline_pairs_by_statistics(tmp_path):
    """Against a model that computes act_in with other ops, the gate names act_in's addmm, now
    computed by B's add, instead of only counting ops gone and new."""
    from energydiag.analyses.numerics_baseline import numerics_gate
    from energydiag.io.rundir import Run

    baseline = tmp_path / "numerics.json"
    base = ["check", str(FIXTURES / "healthy"), "--numerics-baseline", str(baseline)]
    assert runner.invoke(app, [*base, "--update-baseline"]).exit_code == 0
    split = split_copy(tmp_path / "split")
    failed = numerics_gate(Run(split), baseline, False, torch.device("cpu"))
    assert failed.status == "failed" and failed.evidence["by_statistics"] > 0
    assert "aten::addmm in 'act_in' (forward, occurrence 1) moved by" in failed.message
    assert "now computed by aten::add" in failed.message
    assert failed.evidence["new"] == 9 and failed.evidence["missing"] == 0


@pytest.mark.parametrize("method", [1, 2])
def test_a_baseline_of_an_earlier_reduction_asks_to_be_written_again(tmp_path, method):
    """Method 1 reduced each tensor whole and method 2 every tensor in chunks, where METHOD 3
    reduces small ones in rows: float64 rounds otherwise, so every op would seem to move; the
    gate says so in one line instead. A baseline without the field is method 1's."""
    baseline = tmp_path / "numerics.json"
    base = ["check", str(FIXTURES / "healthy"), "--numerics-baseline", str(baseline)]
    assert runner.invoke(app, [*base, "--update-baseline"]).exit_code == 0
    stored = json.loads(baseline.read_text())
    assert stored["method"] == METHOD == 3
    if method == 1:
        del stored["method"]
    else:
        stored["method"] = method
    baseline.write_text(json.dumps(stored))
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert f"{baseline}: fingerprinted by method {method}" in line and "(--update-baseline)" in line


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_runs_of_a_hand_written_loop_pass_their_own_baseline(tmp_path, seed):
    """Healthy controls, three seeds of a plain loop (AdamW, clipping, a StepLR schedule): a
    baseline of steps 4..6, written from checkpoint 4, passes on the same run replayed again."""
    from handloop import train

    def schedule(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)

    root = train(tmp_path / "run", steps=8, checkpoint_every=4, seed=seed, scheduler=schedule).root
    base = ["check", str(root), "--numerics-baseline", str(tmp_path / "numerics.json")]
    written = runner.invoke(app, [*base, "--update-baseline", "--numerics-step", "4..6"])
    assert "ops of steps 4..6" in written.stdout
    numerics = numerics_check(base)
    assert numerics["status"] == "passed" and numerics["evidence"]["steps"] == [4, 6]
    assert numerics["evidence"]["missing"] == numerics["evidence"]["new"] == 0
