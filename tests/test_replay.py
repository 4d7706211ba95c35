import json
import math

import pytest
import torch

from energydiag.analyses.replaying import replay_report
from energydiag.engine.localise import localise
from energydiag.engine.replay import replay, state_before
from energydiag.errors import DiagError
from energydiag.io.rundir import Run
from energydiag.io.tensorfile import read_all, write_atomic
from energydiag.reference.synthetic import record_run


def test_nan_fixture_localised_exactly(fixtures_dir):
    expected = json.loads((fixtures_dir / "nan" / "expected.json").read_text())
    result = replay_report(Run(fixtures_dir / "nan"), 40)
    fault = result.fault
    assert fault.step == expected["first_nonfinite_step"]
    assert fault.phase == expected["phase"]
    assert fault.module == expected["module"]
    assert fault.op.op == expected["op"]
    assert fault.all_masked_samples == [expected["sample"]]
    assert fault.op.detail["rows_all_neg_inf"] > 0
    assert fault.reproduced is True
    fid = result.fidelity
    # steps 40..56 compared; NaN against NaN at 57 is agreement on failure, not exactness
    assert (fid["compared"], fid["nonfinite_on_both"], fid["mismatched"]) == (17, 1, 0)
    if fid["expected"] == "bit-exact":  # recorded on a machine like this one
        assert fid["bit_exact"] and fid["max_loss_deviation"] == 0.0
    assert result.findings[0].code == "nonfinite.forward"


def test_healthy_replay_is_bit_exact_and_records_statistics(fixtures_dir):
    report = replay_report(Run(fixtures_dir / "healthy"), 100, to_step=119, every=5)
    fid = report.fidelity
    assert report.fault is None and fid["compared"] == 20
    assert [c["step"] for c in fid["parameter_checks"]] == [120]  # reached checkpoint 120
    if fid["expected"] == "bit-exact":
        assert fid["bit_exact"] and fid["max_parameter_deviation"] == 0.0 and report.findings == []
    else:  # another CPU kernel level or thread count: close, and said to be approximate
        assert fid["max_relative_deviation"] < 1e-4
        assert [f.code for f in report.findings] == ["replay.approximate"]
    stats = report.result.table.dropna(subset=["energy_min"])
    assert list(stats["step"]) == [100, 105, 110, 115]
    assert (stats["energy_max"] >= stats["energy_min"]).all()
    assert {"saturation", "update_ratio", "logit_spread", "grad_norm/attn"} <= set(stats.columns)


def _run_with(tmp_path, **kwargs):
    record_run(tmp_path / "r", steps=8, checkpoint_every=4, **kwargs)
    return tmp_path / "r"


def _edit_checkpoint(path, tensors_fn=None, meta_fn=None):
    tensors, meta = read_all(path)
    if tensors_fn:
        tensors_fn(tensors)
    if meta_fn:
        meta_fn(meta)
    write_atomic(path, tensors, {k: v for k, v in meta.items() if k != "format"})


def test_data_phase_names_tensor_and_sample(tmp_path):
    def poison(step, batch):
        if step == 6:
            batch["h"][3, 2, 1] = math.inf

    result = replay(Run(_run_with(tmp_path, fault=poison)), 4)
    assert (result.fault.step, result.fault.phase) == (6, "data")
    assert (result.fault.tensor, result.fault.sample) == ("h", 3)


def test_forward_overflow_in_named_layer(tmp_path):
    run_dir = _run_with(tmp_path)

    def blow_up(t):
        t["model.ctx_in.weight"].fill_(1e38)  # finite weights whose dot products overflow

    _edit_checkpoint(run_dir / "checkpoints" / "step-00000004.safetensors", blow_up)
    fault = replay(Run(run_dir), 4).fault
    assert (fault.step, fault.phase, fault.module) == (4, "forward", "ctx_in")
    assert fault.op.gained == "Inf" and fault.op.module == "ctx_in"
    assert all(s.finite for s in fault.op.inputs)


def test_backward_only_nan(tmp_path):
    run_dir = _run_with(tmp_path, loss={"target": "faulty:sqrt_at_zero_loss"})
    result = replay(Run(run_dir), 0)
    fault = result.fault
    assert (fault.step, fault.phase) == (0, "backward")
    assert fault.op.autograd_node == "SqrtBackward0"
    assert fault.parameters  # every parameter upstream of the energy


def _set_recorded_lr(run_dir, step, lr):
    """Plant a schedule bug in what the Recorder stored: the lr step ``step`` used."""

    def spike(meta):
        groups = json.loads(meta["hyperparameters"])
        groups[0]["lr"] = lr
        meta["hyperparameters"] = json.dumps(groups)

    _edit_checkpoint(run_dir / "batches" / f"step-{step:08d}.safetensors", meta_fn=spike)


def test_optimizer_blow_up_from_learning_rate_spike(tmp_path):
    """A warm-up schedule lr = base * step / warmup_steps with warmup_steps = 0 yields lr = inf."""
    run_dir = _run_with(tmp_path)
    _set_recorded_lr(run_dir, 4, math.inf)
    fault = replay(Run(run_dir), 4).fault
    assert (fault.step, fault.phase) == (4, "optimizer")
    assert fault.parameters
    first = fault.parameters[0]
    assert fault.optimizer_state[first]["lr"] == math.inf
    assert math.isfinite(fault.optimizer_state[first]["grad_abs_max"])


def test_exception_in_user_forward_is_a_fault_not_a_crash(fixtures_dir, tmp_path):
    import shutil

    run_dir = tmp_path / "nan"
    shutil.copytree(fixtures_dir / "nan", run_dir)
    manifest = json.loads((run_dir / "run.json").read_text())
    manifest["model"]["target"] = "faulty:GuardedEnergyModel"
    (run_dir / "run.json").write_text(json.dumps(manifest))
    fault = replay(Run(run_dir), 50).fault
    assert (fault.step, fault.phase) == (57, "forward")
    assert "every key masked" in fault.exception
    assert fault.all_masked_samples == [5]


def test_exception_in_optimizer_is_a_fault(tmp_path):
    run_dir = _run_with(tmp_path)
    _set_recorded_lr(run_dir, 4, 1e39)  # finite in Python, not in float32: Adam raises
    fault = replay(Run(run_dir), 4).fault
    assert (fault.step, fault.phase) == (4, "optimizer")
    assert "overflow" in fault.exception


def test_deep_rerun_does_not_change_what_happened(small_run):
    """Instrumented re-run of a healthy step == the plain step, to the bit."""
    run = Run(small_run)
    plain = state_before(run, 6, torch.device("cpu"))
    batch = run.batch(6)
    plain.train(batch)
    probed = state_before(run, 6, torch.device("cpu"))
    assert localise(probed, batch) is None
    for (name, a), b in zip(
        plain.model.state_dict().items(), probed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_gap_in_batches_is_an_error(small_run):
    (small_run / "batches" / "step-00000006.safetensors").unlink()
    with pytest.raises(DiagError, match="missing batches for steps 6"):
        replay(Run(small_run), 4, to_step=10)


def test_divergent_manifest_is_reported(small_run):
    manifest = json.loads((small_run / "run.json").read_text())
    manifest["loss"]["kwargs"]["tau"] = 0.7
    (small_run / "run.json").write_text(json.dumps(manifest))
    result = replay_report(Run(small_run), 4)
    assert result.fidelity["max_loss_deviation"] > 0 and result.fidelity["expected"] == "bit-exact"
    assert [f.code for f in result.findings] == ["replay.diverges"]


def test_to_step_before_from_step_and_not_a_run(tmp_path, fixtures_dir):
    from typer.testing import CliRunner

    from energydiag.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["replay", str(fixtures_dir / "nan"), "--from-step", "3", "--to-step", "1"]
    )
    assert result.exit_code == 2 and "--to-step 1: is before the first step 3" in result.stderr
    result = runner.invoke(app, ["replay", str(tmp_path), "--from-step", "3"])
    assert result.exit_code == 2 and "not an energydiag run directory" in result.stderr


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_metrics_out_table(fixtures_dir, tmp_path, suffix):
    import pandas as pd
    from typer.testing import CliRunner

    from energydiag.cli import app

    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    target = tmp_path / f"steps{suffix}"
    args = [
        "replay",
        str(fixtures_dir / "healthy"),
        "--from-step",
        "100",
        "--to-step",
        "109",
        "--every",
        "5",
        "--metrics-out",
        str(target),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(target) if suffix == ".csv" else pd.read_parquet(target)
    assert list(table["step"]) == list(range(100, 110))
    assert (table["loss"] - table["logged_loss"]).abs().max() < 1e-4
    assert table["energy_min"].notna().sum() == 2  # statistics at steps 100 and 105
