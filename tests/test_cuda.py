"""CUDA replay: run where a GPU exists (scripts/gpu-check.sh), skipped on CPU-only machines."""

from __future__ import annotations

import pytest
import torch
from handloop import train

from energydiag.analyses.replaying import replay_report
from energydiag.io.rundir import Run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_recorded_on_cpu_replays_on_cuda_close_and_says_so(tmp_path):
    train(tmp_path / "run", steps=6, model_kwargs={"dropout": 0.0})
    report = replay_report(Run(tmp_path / "run"), 0, device=torch.device("cuda"))
    fid = report.fidelity
    assert fid["expected"] == "approximate" and any("device" in e for e in fid["environment"])
    assert fid["max_relative_deviation"] < 1e-3


def test_cuda_rng_restored_for_dropout(tmp_path):
    root = tmp_path / "run"
    with torch.device("cuda"):
        train(root, steps=6, model_kwargs={"dropout": 0.2})
    report = replay_report(Run(root), 0, device=torch.device("cuda"))
    assert report.fidelity["compared"] == 6
    assert report.fidelity["max_relative_deviation"] < 1e-5


def test_diff_names_where_cuda_and_cpu_kernels_part(tmp_path):
    """`diff --against device=cuda`: the same step on the CPU and on the GPU, op by op; CUDA's
    kernels may part from the CPU's beyond 16 eps, and then the float64 re-run on each side
    says whether that is rounding or one side less accurate."""
    import json

    from conftest import FIXTURES
    from typer.testing import CliRunner

    from energydiag.cli import app

    args = ["diff", str(FIXTURES / "healthy"), "--step", "40", "--against", "device=cuda"]
    result = CliRunner().invoke(app, [*args, "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code in (0, 1) and report["aligned"] > 300
    first = report["first_divergence"]
    assert first is None or first["shadow"] is not None or first["phase"] != "forward"


def test_hf_fp16_on_cuda_records_accelerates_scaler(tmp_path):
    """The HF Trainer's real fp16 path: accelerate's GradScaler and float16 autocast on a GPU
    (the CPU tests stand a CPU scaler in for it, tests/test_hf_fp16.py)."""
    pytest.importorskip("transformers")
    from test_integrations import fit_hf

    fit_hf(tmp_path / "run", steps=10, fp16=True, use_cpu=False)
    run = Run(tmp_path / "run")
    assert run.manifest.autocast_dtype == "float16" and run.manifest.scaler is not None
    report = replay_report(run, 0, device=torch.device("cuda"))
    assert report.fault is None and report.fidelity["compared"] == 10
    assert report.fidelity["max_relative_deviation"] < 1e-5
