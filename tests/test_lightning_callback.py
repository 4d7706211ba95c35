"""The Lightning callback: 16-mixed with its GradScaler, recorded (issue 24, item 7), and what
it refuses. On the CPU Lightning turns ``precision="16-mixed"`` into bf16, so these runs pass
``MixedPrecision("16-mixed", "cpu")`` explicitly: real float16 autocast and a real scaler, the
path a GPU run takes."""

from __future__ import annotations

import pytest
import torch
from test_integrations import fit_lightning

from energydiag.analyses.diagnosis import Verdict, diagnose
from energydiag.analyses.replaying import replay_report
from energydiag.io.rundir import Run


def fp16_plugin(**kwargs):
    """Imported here, not at collection: lightning takes seconds to import."""
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", **kwargs)


def fit_fp16(root, steps: int, seed: int = 0, **trainer_args):
    plugin = fp16_plugin()
    return fit_lightning(root, steps, trainer_args={"plugins": [plugin], **trainer_args}, seed=seed)


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16") / "run"
    fit_fp16(root, steps=12)
    return Run(root)


def test_a_16_mixed_run_records_its_scaler_and_replays_bit_exact(fp16_run):
    manifest = fp16_run.manifest
    assert manifest.autocast_dtype == "float16" and manifest.scaler["init_scale"] == 2.0**16
    states = [fp16_run.batch(s).scaler_state for s in range(12)]
    assert all(state is not None for state in states)
    report = replay_report(fp16_run, 0).summary()
    assert report.fault is None
    assert report.fidelity["bit_exact"] and report.fidelity["compared"] == 12
    assert all(c["max_abs_diff"] == 0.0 for c in report.fidelity["parameter_checks"])


def test_the_recorded_loss_is_the_unscaled_one(fp16_run):
    """Lightning hands on_before_backward the loss times the scale (65536 at first)."""
    logged = fp16_run.metrics()["loss"].tolist()[:3]
    replayed = replay_report(fp16_run, 0, 2).result.steps
    assert all(0 < loss < 100 for loss in logged)
    assert [row["loss"] for row in replayed] == [row["logged_loss"] for row in replayed] == logged


@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_16_mixed_runs_are_healthy_though_the_scaler_skipped_steps(tmp_path, seed):
    """The scaler starts at 65536 and halves on its first overflows: those steps log a
    non-finite gradient norm, which is no failure under a GradScaler."""
    fit_fp16(tmp_path / "run", steps=12, seed=seed)
    run = Run(tmp_path / "run")
    skipped = [s["step"] for s in replay_report(run, 0).summary().skipped_steps]
    assert 0 < len(skipped) < 12  # the control is meaningful: some steps were skipped
    assert run.first_failure() is None
    found = diagnose(run)
    assert found.verdict == Verdict.HEALTHY and not found.failed
    assert "amp.never_updated" not in [f.code for f in found.findings]


def test_an_overflowing_scale_skips_steps_that_replay_skips_too(tmp_path):
    """A scale of 2**30 overflows float16 gradients: the scaler halves it and skips the step,
    step after step. Those steps are expected, not faults, and replay skips the same ones;
    but a run that skipped every step trained nothing, and diagnose says so."""
    plugin = fp16_plugin(scaler=torch.amp.GradScaler("cpu", 2.0**30))
    fit_lightning(tmp_path / "run", 10, trainer_args={"plugins": [plugin]})
    run = Run(tmp_path / "run")
    report = replay_report(run, 0).summary()
    skipped = [s["step"] for s in report.skipped_steps]
    assert report.fault is None and report.fidelity["bit_exact"]
    assert skipped == list(range(10))  # 2**30 halved ten times still overflows
    assert not (tmp_path / "run" / "failure.json").exists()
    found = diagnose(run)
    never = next(f for f in found.findings if f.code == "amp.never_updated")
    assert found.verdict == Verdict.STALLED and never.severity == "error"
    assert "1.07374e+09 down to 2.09715e+06" in never.title
    assert "lower init_scale" in never.remedy  # the scale was still above 1: still searching


def test_16_mixed_with_accumulation_replays_bit_exact(tmp_path):
    fit_fp16(tmp_path / "run", steps=4, accumulate_grad_batches=2)
    run = Run(tmp_path / "run")
    assert run.manifest.step == "energydiag.record.accumulation:accumulated_step"
    report = replay_report(run, 0).summary()
    assert report.fault is None and report.fidelity["bit_exact"]
    assert report.fidelity["compared"] == 4


def test_several_processes_without_ddp_around_the_module_are_refused_in_one_line():
    """DDP is recorded as DDP (tests/test_trainer_ddp.py); a strategy that wraps the module
    otherwise (FSDP, DeepSpeed) would have each rank record its shard or copy as the model:
    refused, not recorded wrong. (A stand-in trainer: those strategies need GPUs.)"""
    from types import SimpleNamespace

    pytest.importorskip("lightning.pytorch")
    from lit_models import LitRegressor

    from energydiag.errors import DiagError
    from energydiag.record.lightning import _check_supported

    class FSDPStrategy(SimpleNamespace):
        pass

    module = LitRegressor()
    trainer = SimpleNamespace(
        optimizers=[object()],
        gradient_clip_val=1.0,
        gradient_clip_algorithm="norm",
        precision="32-true",
        world_size=2,
        strategy=FSDPStrategy(model=module),
    )
    with pytest.raises(DiagError, match="with 2 processes under FSDPStrategy$"):
        _check_supported(trainer, module)
