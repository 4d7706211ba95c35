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
