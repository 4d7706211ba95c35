"""The live monitors through each trainer's callback (issue 24): one bad label, a gradient spike
each time its batch comes round, alarms on its step under Lightning and the HF Trainer, and
``skip`` drops that update; healthy runs across seeds raise nothing. The lr ramp through both
trainers is in test_integrations."""

from __future__ import annotations

import json

import pytest
from test_integrations import alerts, fit_hf, fit_lightning

from energydiag.io.rundir import Run

ROWS = 400  # 50 batches of 8: the bad label's batch first comes after the band's 25 steps
LIGHTNING_ROW = 245  # batch 30, in order
HF_ROW = 179  # the Trainer's shuffle (seed 0) brings its batch at step 30


def test_lightning_spike_alarms_on_its_step_and_skip_drops_it(tmp_path):
    fit_lightning(tmp_path / "warn", steps=36, spike_row=LIGHTNING_ROW, rows=ROWS)
    first = alerts(tmp_path / "warn")[0]
    assert (first["step"], first["rule"]) == (30, "grad_norm_band")
    fit_lightning(tmp_path / "skip", steps=36, spike_row=LIGHTNING_ROW, rows=ROWS, on_alarm="skip")
    listed = json.loads((tmp_path / "skip" / "skip_batches.json").read_text())
    assert listed["steps"] == [30]
    run = Run(tmp_path / "skip")
    assert run.skipped_steps == frozenset({30})
    before, after = (run.checkpoint(s).model for s in (28, 32))
    assert any((before[k] != after[k]).any() for k in before)  # the other steps still learn


def test_hf_spike_alarms_on_its_step(tmp_path):
    """Unclipped (max_grad_norm 0), so the norm the Trainer shows is the gradient's own; the
    Trainer shuffles, so the step is the one whose batch holds the bad label."""
    fit_hf(tmp_path / "run", steps=50, max_grad_norm=0.0, spike_row=HF_ROW, rows=ROWS)
    run = Run(tmp_path / "run")
    (spiked,) = [s for s in range(50) if (run.batch(s).tensors["labels"].abs() > 100).any()]
    assert spiked == 30
    first = alerts(tmp_path / "run")[0]
    assert (first["step"], first["rule"]) == (spiked, "grad_norm_band")


@pytest.mark.parametrize("seed", range(4))
def test_healthy_trainer_runs_raise_no_alarm(tmp_path, seed):
    fit_lightning(tmp_path / "lightning", steps=60, seed=seed)
    fit_hf(tmp_path / "hf", steps=60, seed=seed)
    assert alerts(tmp_path / "lightning") == [] and alerts(tmp_path / "hf") == []
