"""Defaults that say what they did: skips are stated, bounds are drawn when they are known, a
plug-in that cannot be imported is bad input, and a broken checkpoint is called broken."""

from __future__ import annotations

import json
import math
import shutil

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from energydiag.cli import app
from energydiag.io.tensorfile import read_metadata

runner = CliRunner()


def invoke(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def test_curves_draw_chance_from_the_batch_size_alone(fixtures_dir):
    result = invoke(
        "curves", fixtures_dir / "healthy" / "metrics.jsonl", "--batch-size", "8", "--json"
    )
    bounds = json.loads(result.stdout)["bounds"]
    assert bounds["chance"] == math.log(8) and "floor" not in bounds


def batch_with(tmp_path, fixtures_dir, **extra):
    source = fixtures_dir / "healthy" / "batches" / "step-00000100.safetensors"
    tensors, meta = load_file(str(source)), read_metadata(source)
    path = tmp_path / "batch-00000100.safetensors"
    save_file({**tensors, **extra}, str(path), metadata=meta)
    return path


def test_negatives_the_loss_ignores_are_named(fixtures_dir, tmp_path):
    a = load_file(str(fixtures_dir / "healthy" / "batches" / "step-00000100.safetensors"))["a_pos"]
    path = batch_with(tmp_path, fixtures_dir, a_neg=a.unsqueeze(1).flip(0).contiguous())
    ckpt = fixtures_dir / "healthy" / "checkpoints" / "step-00000100.safetensors"
    result = invoke("inspect", ckpt, "--run", fixtures_dir / "healthy", "--batch", path, "--json")
    found = [f["code"] for f in json.loads(result.stdout)["findings"]]
    assert "inspect.unused_negatives" in found


def test_a_batch_that_is_not_an_energy_batch_is_a_stated_skip(fixtures_dir, tmp_path):
    path = tmp_path / "batch-00000100.safetensors"
    save_file({"x": torch.zeros(4, 3), "y": torch.zeros(4)}, str(path))
    ckpt = fixtures_dir / "healthy" / "checkpoints" / "step-00000100.safetensors"
    result = invoke("inspect", ckpt, "--run", fixtures_dir / "healthy", "--batch", path)
    assert result.exit_code == 0 and "No findings" not in result.stdout
    assert "was not judged" in result.stdout and "step 100" in result.stdout


def test_a_plugin_that_cannot_be_imported_is_bad_input_naming_run_json(fixtures_dir, tmp_path):
    run = tmp_path / "nan"
    shutil.copytree(fixtures_dir / "nan", run)
    manifest = json.loads((run / "run.json").read_text())
    manifest["model"]["target"] = "not_installed_pkg.models:EnergyModel"
    (run / "run.json").write_text(json.dumps(manifest))
    result = invoke("diagnose", run)
    assert result.exit_code == 2
    assert "run.json" in result.stderr and "PYTHONPATH" in result.stderr
    assert "keep the batches" not in result.output


def test_check_says_why_checks_were_skipped(fixtures_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fixtures_dir / "healthy", run)
    shutil.rmtree(run / "batches")
    result = invoke("check", run)
    assert result.exit_code == 0 and "skipped" in result.stdout
    assert "no checkpoint has a logged batch" in result.stdout
    report = json.loads(invoke("check", run, "--json").stdout)
    assert report["skipped"] == sum(c["status"] == "skipped" for c in report["checks"]) > 0


def test_a_nan_checkpoint_is_non_finite_on_the_timeline_and_in_check(fixtures_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fixtures_dir / "healthy", run)
    last = run / "checkpoints" / "step-00000160.safetensors"
    tensors, meta = load_file(str(last)), read_metadata(last)
    save_file({k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in tensors.items()}, str(last), metadata=meta)  # fmt: skip
    line = json.loads(invoke("timeline", run, "--json").stdout)
    assert line["rows"][-1]["state"] == "non-finite"
    assert "timeline.nonfinite" in [f["code"] for f in line["findings"]]
    report = json.loads(invoke("check", run, "--json").stdout)
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["no_nonfinite"] == "failed"
    assert report["measurements"]["weights_step"] == 160


def test_inspect_names_a_forward_that_goes_nan(fixtures_dir):
    run = fixtures_dir / "nan"
    result = invoke(
        "inspect", run / "checkpoints" / "step-00000050.safetensors", "--run", run,
        "--batch", run / "batches" / "step-00000057.safetensors", "--json",
    )  # fmt: skip
    found = json.loads(result.stdout)["findings"]
    codes = [f["code"] for f in found]
    assert "inspect.nonfinite_forward" in codes
    assert not {"energy.narrow_range", "contrastive.at_chance", "loss.at_chance"} & set(codes)


def test_a_batch_with_a_nan_context_is_named_not_a_crash(fixtures_dir, tmp_path):
    """The doctor's statistics (an SVD of the contexts among them) are not taken of NaN."""
    source = fixtures_dir / "healthy" / "batches" / "step-00000100.safetensors"
    tensors = load_file(str(source))
    tensors["h"][0, 0, 0] = math.nan
    path = batch_with(tmp_path, fixtures_dir, h=tensors["h"])
    ckpt = fixtures_dir / "healthy" / "checkpoints" / "step-00000100.safetensors"
    result = invoke("inspect", ckpt, "--run", fixtures_dir / "healthy", "--batch", path, "--json")
    assert result.exit_code == 1, result.output
    assert "inspect.nonfinite_forward" in [f["code"] for f in json.loads(result.stdout)["findings"]]
