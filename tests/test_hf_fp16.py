"""The HF callback under ``fp16=True`` (issue 24, item 7). accelerate makes a GradScaler and
float16 autocast only off the CPU; here the GPU's path is taken on the CPU by handing the
Trainer's accelerator a CPU GradScaler (what accelerate's constructor does on a GPU), so the
autocast, the scaled backward, the unscale before clipping and the scaler's step are the real
Trainer's. A plain CPU ``fp16=True`` run is fp32 and must be recorded as such."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_integrations import fit_hf

from energydiag.analyses.diagnosis import Verdict, diagnose
from energydiag.analyses.replaying import replay_report
from energydiag.io.rundir import Run

pytest.importorskip("transformers")
from energydiag.record.hf import EnergydiagCallback  # noqa: E402

STEPS = 10


def fit_fp16(root, max_grad_norm: float, seed: int = 0):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    return fit_hf(root, STEPS, max_grad_norm=max_grad_norm, fp16=True, scaler=scaler, seed=seed)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_an_fp16_run_records_its_scaler_and_replays_bit_exact(tmp_path, max_grad_norm):
    fit_fp16(tmp_path / "run", max_grad_norm)
    run = Run(tmp_path / "run")
    assert run.manifest.autocast_dtype == "float16"
    assert run.manifest.scaler["init_scale"] == 2.0**16
    assert all(run.batch(s).scaler_state is not None for s in range(STEPS))
    report = replay_report(run, 0).summary()
    assert report.fault is None
    assert report.fidelity["bit_exact"] and report.fidelity["compared"] == STEPS
    assert all(c["max_abs_diff"] == 0.0 for c in report.fidelity["parameter_checks"])
    # 2**16 overflows float16 gradients on the first step: the scaler skipped it, and so did replay
    assert [s["step"] for s in report.skipped_steps] == [0]
    assert (tmp_path / "run" / "failure.json").exists() is False


@pytest.mark.parametrize("seed", [1, 2])
def test_healthy_fp16_runs_are_healthy_though_the_scaler_skipped_steps(tmp_path, seed):
    """The healthy control: the skipped first steps log a non-finite gradient norm, which is
    no failure under a GradScaler, and diagnose says healthy."""
    fit_fp16(tmp_path / "run", max_grad_norm=1.0, seed=seed)
    run = Run(tmp_path / "run")
    assert replay_report(run, 0).summary().skipped_steps  # the control is meaningful
    assert run.first_failure() is None
    found = diagnose(run)
    assert found.verdict == Verdict.HEALTHY and not found.failed
    assert "amp.never_updated" not in [f.code for f in found.findings]


def test_the_recorded_gradient_norm_is_the_unscaled_one(tmp_path):
    """Without clipping, the norm the callback logs is the one replay computes after unscale_,
    not the scaled one (32768 times larger here)."""
    fit_fp16(tmp_path / "run", max_grad_norm=0.0)
    run = Run(tmp_path / "run")
    logged = run.metrics()["grad_norm"].tolist()
    replayed = [row["grad_norm"] for row in replay_report(run, 0).summary().steps]
    finite = [(a, b) for a, b in zip(logged, replayed, strict=True) if math.isfinite(b)]
    assert len(finite) == STEPS - 1
    assert all(a == pytest.approx(b, rel=1e-6) for a, b in finite)


def test_gradients_the_trainer_left_scaled_are_unscaled_for_the_log():
    """transformers before 5 unscales only when it clips; the scaler's stage says which."""
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    callback = EnergydiagCallback()
    callback.scaler, callback.recorder = scaler, SimpleNamespace(optimizer=optimizer)
    true_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm() / 2.0**10
    assert callback._unscaled_norm(model).item() == pytest.approx(true_norm.item())
    scaler.unscale_(optimizer)
    assert callback._unscaled_norm(model).item() == pytest.approx(true_norm.item())


def test_fp16_on_the_cpu_is_recorded_as_the_fp32_run_it_is(tmp_path):
    """accelerate runs CPU ``fp16=True`` with neither autocast nor a scaler."""
    fit_hf(tmp_path / "run", STEPS, fp16=True)
    run = Run(tmp_path / "run")
    assert run.manifest.autocast_dtype is None and run.manifest.scaler is None
    report = replay_report(run, 0).summary()
    assert report.fidelity["bit_exact"] and report.fidelity["compared"] == STEPS
