"""Meeting real runs where they are: .pt checkpoints named by step, a W&B CSV, a guarded model."""

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from energydiag.analyses.bisection import bisect_checkpoints
from energydiag.analyses.inspection import inspect
from energydiag.cli import app
from energydiag.engine.replay import replay
from energydiag.io.rundir import Run
from energydiag.io.torchfiles import discover, load_tensor_dict
from energydiag.reference.models import EnergyModel
from energydiag.reference.synthetic import Task, batches

runner = CliRunner()
TASK = Task()
KWARGS = {
    "d_context": TASK.d_context,
    "d_action": TASK.d_action,
    "horizon": TASK.horizon,
    "d_model": 16,
    "head": "sigmoid",
}
PATTERN = "*/energy_model--{step}_checkpoint.pt"
STEPS = [10000 * i for i in range(1, 9)]
FIRST_NAN = 60000


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Their layout: one folder per checkpoint, state dicts saved with torch.save, no optimizer."""
    from energydiag.reference.models import EnergyModel

    root = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    model = EnergyModel(**KWARGS)
    for step in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.001 * torch.randn_like(p))
            if step == FIRST_NAN:
                model.attn.in_proj_weight[2, 3] = math.nan
        state = model.state_dict()
        if step % 20000 == 0:  # some saved from DDP, wrapped
            state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
        folder = root / f"run--{step}_chkpt"
        folder.mkdir()
        torch.save(state, folder / f"energy_model--{step}_checkpoint.pt")
    batch = next(batches(TASK, 1))
    batch["h"] = batch["h"].to(torch.bfloat16)  # the policy's hidden states arrive in bf16
    batch["pad_mask"][3] = True  # and one sample has every key padded
    torch.save(batch, root / "batch-50000.pt")
    rows = [
        "Step,VLA Train/Energy Loss,VLA Train/Energy Loss__MIN,VLA Train/Energy Loss__MAX,VLA Train/Positive Energy"
    ]
    rows += [
        f"{s},{math.log(8):.6f},{math.log(8) - 1e-4:.6f},{math.log(8) + 1e-4:.6f},0.99"
        for s in range(0, 60000, 10)
    ]
    (root / "wandb_export.csv").write_text("\n".join(rows) + "\n")
    return root


def test_discovery_and_unwrapping(foreign):
    timeline = discover(foreign, PATTERN)
    assert list(timeline) == STEPS
    state = load_tensor_dict(timeline[20000])  # {"state_dict": {"module.x": ...}}
    assert "attn.in_proj_weight" in state and not any(k.startswith("module.") for k in state)


def test_inspect_pt_names_the_planted_tensor(foreign):
    report = inspect(discover(foreign, PATTERN)[FIRST_NAN])
    bad = [(t.name, t.nan, t.first_nonfinite) for t in report.checkpoint.tensors if t.nonfinite]
    assert bad == [("attn.in_proj_weight", 1, [2, 3])]
    assert report.findings[0].code == "checkpoint.nonfinite"


def test_checkpoint_only_bisect(foreign):
    result = bisect_checkpoints(discover(foreign, PATTERN))
    assert (result.last_good_checkpoint, result.first_bad_checkpoint) == (
        FIRST_NAN - 10000,
        FIRST_NAN,
    )
    # the first checkpoint (the growth reference), the last, then halving
    assert result.checkpoint_evaluations <= math.ceil(math.log2(len(STEPS))) + 2
    cli = runner.invoke(app, ["bisect", str(foreign), "--checkpoints", PATTERN, "--json"])
    assert cli.exit_code == 1 and json.loads(cli.stdout)["first_bad_checkpoint"] == FIRST_NAN


def convert_args(foreign, out, model="energydiag.reference.models:EnergyModel", *options):
    """The folder of .pt files into a run directory, with the model; ``options`` say the rest."""
    model_args = ["--model", model, "--model-kwargs", json.dumps(KWARGS)]
    return [
        "convert",
        str(foreign),
        "--checkpoints",
        PATTERN,
        "--out",
        str(out),
        *model_args,
        *options,
    ]


def their_run_args(foreign, out, model="energydiag.reference.models:EnergyModel"):
    """Their set-up: InfoNCE at tau 0.5, clip 1.0, the saved bf16 batch and the W&B export."""
    return convert_args(
        foreign,
        out,
        model,
        "--tau",
        "0.5",
        "--grad-clip",
        "1.0",
        "--batch",
        f"50000={foreign / 'batch-50000.pt'}",
        "--metrics",
        str(foreign / "wandb_export.csv"),
        "--metric",
        "energy loss",
    )


def test_convert_then_replay_localises(foreign, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, their_run_args(foreign, out))
    assert result.exit_code == 0, result.output
    run = Run(out)
    assert run.checkpoint_steps == STEPS and run.batch_steps == [50000]
    assert run.batch(50000).tensors["h"].dtype == torch.bfloat16
    fault = replay(run, 50000).fault
    assert (fault.step, fault.phase, fault.module, fault.op.op) == (
        50000,
        "forward",
        "attn",
        "aten::_softmax",
    )
    assert fault.all_masked_samples == [3]
    # nothing is overwritten without asking
    again = runner.invoke(app, their_run_args(foreign, out))
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_guarded_model_raising_is_a_finding(foreign, tmp_path):
    out = tmp_path / "run"
    assert (
        runner.invoke(app, their_run_args(foreign, out, "faulty:GuardedEnergyModel")).exit_code == 0
    )
    fault = replay(Run(out), 50000).fault
    assert fault.step == 50000 and "every key masked" in fault.exception
    report = inspect(out / "checkpoints" / "step-00050000.safetensors")
    (raised,) = [f for f in report.findings if f.code == "model.raised"]
    assert raised.evidence["step"] == 50000 and "every key masked" in raised.evidence["exception"]


def test_wandb_curve_plateau_at_chance_for_the_actual_batch_size(foreign):
    def curves(batch_size):
        args = [
            "curves",
            str(foreign / "wandb_export.csv"),
            "--metric",
            "energy loss",
            "--batch-size",
            str(batch_size),
            "--tau",
            "0.5",
            "--energy-span",
            "1",
            "--json",
        ]
        return json.loads(runner.invoke(app, args).stdout)

    b8 = curves(8)
    assert b8["metric"] == "VLA Train/Energy Loss" and b8["plateau_on"] == "chance"
    b24 = curves(24)
    assert b24["bounds"]["chance"] == pytest.approx(math.log(24))
    assert b24["bounds"]["floor"] == pytest.approx(math.log(1 + 23 * math.exp(-2)))
    assert b24["plateau_on"] is None  # log 8 is not chance for B = 24


def test_bf16_inputs_coarser_than_the_energy_gap(fixtures_dir, tmp_path):
    batch = Run(fixtures_dir / "stalled").batch(60).tensors
    torch.save({**batch, "h": batch["h"].to(torch.bfloat16)}, tmp_path / "b.pt")
    report = inspect(
        fixtures_dir / "stalled" / "checkpoints" / "step-00000060.safetensors",
        batch_path=tmp_path / "b.pt",
    )
    (coarse,) = [f for f in report.findings if f.code == "data.coarse_inputs"]
    assert coarse.evidence["inputs"] == {"h": "bfloat16"}


def test_unreachable_margin(foreign, tmp_path):
    batch = next(batches(TASK, 2))
    batch["layer_actions.0"] = batch["a_pos"].flip(0)
    torch.save(batch, tmp_path / "b.pt")
    out = tmp_path / "run"
    args = convert_args(
        foreign,
        out,
        "energydiag.reference.models:EnergyModel",
        "--loss",
        "margin",
        "--margin",
        "1.5",
        "--batch",
        f"10000={tmp_path / 'b.pt'}",
    )
    assert runner.invoke(app, args).exit_code == 0
    report = inspect(out / "checkpoints" / "step-00010000.safetensors")
    (finding,) = [f for f in report.findings if f.code == "head.unreachable_margin"]
    assert finding.evidence["margin"] == 1.5
    assert (report.batch.batch_size, report.batch.candidates) == (
        8,
        2,
    )  # a positive and one negative


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


def test_pickle_with_arbitrary_objects_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"w": torch.zeros(2), "x": Evil(marker)}, f)
    torch.save({"w": torch.zeros(2), "x": Evil(marker)}, tmp_path / "evil_zip.pt")
    for candidate in (path, tmp_path / "evil_zip.pt"):
        result = runner.invoke(app, ["inspect", str(candidate)])
        assert result.exit_code == 2 and "refused" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_trainer_checkpoint_by_content_with_optimizer_state(tmp_path):
    model = EnergyModel(**KWARGS)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 6, 16), torch.randn(2, 4, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "run--300_chkpt" / "energy--300.ckpt"  # not a .pt suffix
    path.parent.mkdir()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"last_epoch": 3},
        },
        path,
    )
    report = inspect(path)
    assert report.checkpoint.step == 300  # from the file name, not "step -1"
    groups = {t.group for t in report.checkpoint.tensors}
    assert groups == {"model", "optimizer"}
    assert report.checkpoint.stats.adam  # both Adam moments of each parameter were paired


def test_self_referencing_checkpoint_is_one_line(tmp_path):
    state = {"w": torch.ones(2)}
    state["state_dict"] = state
    torch.save(state, tmp_path / "loop.pt")
    result = runner.invoke(app, ["inspect", str(tmp_path / "loop.pt")])
    assert result.exit_code == 2 and "contains itself" in result.stderr
