"""`energydiag landscape` on hand-written runs: dropout left live during refinement, a step size
that overshoots, and a smooth model refined properly (no findings)."""

from __future__ import annotations

import json

import pytest
from handloop import train
from typer.testing import CliRunner

from energydiag.analyses.landscape import landscape
from energydiag.cli import app


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("landscape")
    for name, kwargs in {"dropout": {"dropout": 0.2}, "smooth": {}}.items():
        train(
            root / name, steps=30, checkpoint_every=10, model_kwargs={"head": "softplus", **kwargs}
        )
    return root


def ckpt(root, name):
    return root / name / "checkpoints" / "step-00000020.safetensors"


def codes(report) -> set[str]:
    return {f.code for f in report.findings}


def test_dropout_live_during_refinement_is_an_error_with_its_energy_change(models):
    report = landscape(ckpt(models, "dropout"))
    found = next(f for f in report.findings if f.code == "landscape.train_mode")
    assert found.severity == "error" and report.train_mode_modules == ["pos_drop"]
    assert report.mode_gap["max"] > 0 and "differs between train and eval" in found.title
    # the same model under a refiner that calls eval() first: nothing live
    fixed = landscape(ckpt(models, "dropout"), refine="faulty:eval_refiner")
    assert fixed.train_mode_modules == [] and "landscape.train_mode" not in codes(fixed)


def test_a_step_size_that_overshoots_is_named_with_the_largest_stable_one(models):
    report = landscape(ckpt(models, "smooth"), alpha=50.0)
    found = next(f for f in report.findings if f.code == "landscape.energy_rises")
    assert report.rising_fraction >= 0.3 and report.stable_alpha is not None
    assert report.stable_alpha < 50 and f"step size ≤ {report.stable_alpha:g}" in found.remedy


def test_a_smooth_model_refined_gently_has_no_findings(models):
    report = landscape(ckpt(models, "smooth"), alpha=0.2)
    assert report.findings == [] and report.rising_fraction < 0.1
    row = report.rows[0]
    assert row["energy_end"] < row["energy_start"] and len(row["energy_chain"]) == 11


def test_the_command_line(models):
    result = CliRunner().invoke(app, ["landscape", str(ckpt(models, "dropout")), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["findings"][0]["code"] == "landscape.train_mode"
    fixed = CliRunner().invoke(app, ["landscape", str(ckpt(models, "dropout")), "--eval", "--json"])
    assert fixed.exit_code == 0 and json.loads(fixed.stdout)["train_mode_modules"] == []
    bad = CliRunner().invoke(app, ["landscape", str(ckpt(models, "smooth")), "--alpha", "0"])
    assert bad.exit_code == 2 and "must be positive" in bad.stderr


def test_eval_mode_hands_over_a_model_with_nothing_live(models):
    report = landscape(ckpt(models, "dropout"), eval_mode=True)
    assert report.train_mode_modules == [] and "eval mode" in report.refiner
