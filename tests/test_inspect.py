import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from energydiag.analyses.inspection import inspect
from energydiag.cli import app
from energydiag.engine.instrument import Instrument
from energydiag.engine.observers import SaturationCounter
from energydiag.io.tensorfile import read_all, write_atomic
from energydiag.reference.models import EnergyModel
from energydiag.reference.synthetic import record_run

runner = CliRunner()


@pytest.fixture
def sigmoid_run(tmp_path):
    """No dropout, so the test can recompute every energy independently, pair by pair."""
    record_run(
        tmp_path / "r",
        steps=6,
        checkpoint_every=5,
        lr=1e-3,
        model_kwargs={"head": "sigmoid", "head_bias_init": 6.9, "dropout": 0.0},
        loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.5}},
    )
    return tmp_path / "r"


def independent_energies(run_dir, step):
    manifest = json.loads((run_dir / "run.json").read_text())
    model = EnergyModel(**manifest["model"]["kwargs"])
    state = load_file(str(run_dir / "checkpoints" / f"step-{step:08d}.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    batch = load_file(str(run_dir / "batches" / f"step-{step:08d}.safetensors"))
    h, a, m = batch["h"], batch["a_pos"], batch["pad_mask"]
    b = h.shape[0]
    with torch.no_grad():
        e = torch.tensor(
            [
                [model(h[i : i + 1], a[j : j + 1], m[i : i + 1]).item() for j in range(b)]
                for i in range(b)
            ]
        )
    return e


def test_batch_numbers_match_an_independent_computation(sigmoid_run):
    e = independent_energies(sigmoid_run, 5)
    tau, b = 0.5, e.shape[0]
    report = inspect(sigmoid_run / "checkpoints" / "step-00000005.safetensors").batch
    got = report.energy
    off = ~torch.eye(b, dtype=torch.bool)
    approx = dict(rel=1e-4, abs=1e-6)
    assert got["energy_min"] == pytest.approx(e.min().item(), **approx)
    assert got["energy_max"] == pytest.approx(e.max().item(), **approx)
    assert got["energy_std"] == pytest.approx(e.std().item(), rel=1e-3)
    assert got["pos_mean"] == pytest.approx(e.diagonal().mean().item(), **approx)
    assert got["neg_mean"] == pytest.approx(e[off].mean().item(), **approx)
    assert got["retrieval_accuracy"] == (e.argmin(1) == torch.arange(b)).float().mean().item()
    assert got["logit_spread"] == pytest.approx((e.max() - e.min()).item() / tau, rel=1e-3)
    # the loss floor a (0, 1) head allows at this tau and B, and chance
    assert report.bounds["head"]["floor"] == pytest.approx(
        math.log(1 + (b - 1) * math.exp(-1.0 / tau)), rel=1e-6
    )
    assert report.bounds["head"]["chance"] == pytest.approx(math.log(b))
    expected_loss = torch.nn.functional.cross_entropy(-e / tau, torch.arange(b)).item()
    assert report.loss == pytest.approx(expected_loss, rel=1e-5)
    # saturation of the functional sigmoid in the head: E - 1e-6 is the sigmoid's output
    s = e - 1e-6
    fraction = ((s < 1e-3) | (s > 1 - 1e-3)).float().mean().item()
    assert 0 < fraction < 1
    (sat,) = [x for x in report.saturation if x["op"] == "aten::sigmoid"]
    assert sat["module"] == "head_out" and sat["total"] == b * b
    assert sat["fraction"] == pytest.approx(fraction, abs=1.5 / (b * b))


def test_instrument_sees_module_and_functional_sigmoids_and_tanh():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Sigmoid()

        def forward(self, x):
            return self.act(x) + torch.nn.functional.sigmoid(2 * x) + torch.tanh(x)

    x = torch.tensor([-10.0, 0.0, 3.6, 8.0])
    counter = SaturationCounter()
    with Instrument([counter]).attached():
        Both()(x)
    by_key = {(s.module, s.op): s for s in counter.rows()}
    assert by_key[("act", "aten::sigmoid")].saturated == 2  # -10 and 8 (sigmoid(3.6) = 0.973)
    assert by_key[("<model>", "aten::sigmoid")].saturated == 3  # 2x: -20, 7.2, 16
    assert by_key[("<model>", "aten::tanh")].saturated == 2  # -10 and 8 (tanh(3.6) = 0.9985)


def test_stalled_fixture_findings(fixtures_dir):
    report = inspect(fixtures_dir / "stalled" / "checkpoints" / "step-00000060.safetensors")
    codes = [f.code for f in report.findings]
    assert codes[:3] == ["activation.saturated", "loss.at_chance", "energy.narrow_range"]
    assert "head.bounded_floor" in codes
    assert report.batch.loss_position > 0.99


def plant(path, changes):
    tensors, meta = read_all(path)
    for name, index, value in changes:
        tensors[name][index] = value
    write_atomic(path, tensors, {k: v for k, v in meta.items() if k != "format"})


def test_planted_nonfinite_values_are_named_with_counts(fixtures_dir, tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    shutil.copy(fixtures_dir / "healthy" / "checkpoints" / "step-00000100.safetensors", ckpt)
    plant(
        ckpt,
        [
            ("model.attn.in_proj_weight", (3, 4), math.nan),
            ("model.attn.in_proj_weight", (5, 1), math.nan),
            ("model.attn.in_proj_weight", (7, 0), math.inf),
            ("optim.pred.1.weight.exp_avg", (0, 2), -math.inf),
        ],
    )
    report = inspect(ckpt)
    bad = {
        t.name: (t.nan, t.posinf, t.neginf, t.first_nonfinite)
        for t in report.checkpoint.tensors
        if t.nonfinite
    }
    assert bad == {
        "model.attn.in_proj_weight": (2, 1, 0, [3, 4]),
        "optim.pred.1.weight.exp_avg": (0, 0, 1, [0, 2]),
    }
    assert report.findings[0].code == "checkpoint.nonfinite"
    result = runner.invoke(app, ["inspect", str(ckpt), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["findings"][0]["evidence"]["tensors"][0]["name"] == "model.attn.in_proj_weight"


def test_checkpoint_rules(fixtures_dir, tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    shutil.copy(fixtures_dir / "healthy" / "checkpoints" / "step-00000100.safetensors", ckpt)
    tensors, meta = read_all(ckpt)
    tensors["model.pred.0.fc1.weight"] *= 1e4
    tensors["optim.act_in.weight.exp_avg_sq"].zero_()
    tensors["optim.act_in.weight.exp_avg"].fill_(1.0)
    write_atomic(ckpt, tensors, {k: v for k, v in meta.items() if k != "format"})
    report = inspect(ckpt)
    by_code = {f.code: f for f in report.findings}
    assert (
        by_code["checkpoint.norm_outlier"].evidence["outliers"][0]["tensor"]
        == "model.pred.0.fc1.weight"
    )
    (risk,) = by_code["optimizer.adam_blowup_risk"].evidence["parameters"]
    assert risk["parameter"] == "act_in.weight" and risk["max_ratio"] == pytest.approx(1e8)


def test_all_masked_row_is_flagged(fixtures_dir):
    report = inspect(fixtures_dir / "nan" / "checkpoints" / "step-00000057.safetensors")
    masked = [f for f in report.findings if f.code == "data.all_masked_row"]
    assert masked and masked[0].evidence["samples"] == [5]


def test_bad_input_is_one_line_exit_2(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = runner.invoke(app, ["inspect", str(broken)])
    assert result.exit_code == 2
    assert "broken.safetensors" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_truncated_checkpoint_is_one_line_exit_2(fixtures_dir, tmp_path):
    ckpt = tmp_path / "cut.safetensors"
    data = (fixtures_dir / "healthy" / "checkpoints" / "step-00000100.safetensors").read_bytes()
    ckpt.write_bytes(data[: len(data) - 1000])
    result = runner.invoke(app, ["inspect", str(ckpt)])
    assert result.exit_code == 2
    assert "cut.safetensors: truncated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_streamed_reader_matches_safetensors(fixtures_dir):
    from energydiag.io.tensorfile import reader

    path = fixtures_dir / "healthy" / "checkpoints" / "step-00000100.safetensors"
    expected = load_file(str(path))
    with reader(path) as r:
        assert sorted(r.names) == sorted(expected)
        assert r.metadata["step"] == "100"
        for name in r.names:
            assert torch.equal(r.get(name), expected[name]), name
