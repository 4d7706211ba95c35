import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from energydiag.engine.environment import capture, differences
from energydiag.io.rundir import Run
from energydiag.reference.fixtures import RECIPES, write_fixtures


def content_hash(path):
    """Tensors and metadata, not bytes: safetensors writes its metadata in a random order."""
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), "pt") as f:
        digest = hashlib.sha256(json.dumps(f.metadata(), sort_keys=True).encode())
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            digest.update(f"{key}{tensor.dtype}{list(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def digest(folder):
    return {
        p.relative_to(folder).as_posix(): content_hash(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", ["healthy", "stalled", "nan"])
def test_fixture_loads_and_has_expected_answers(fixtures_dir, name):
    run = Run(fixtures_dir / name)
    expected = json.loads((fixtures_dir / name / "expected.json").read_text())
    assert expected["diagnosis"] == name
    assert run.checkpoint_steps and run.batch_steps


def test_fixtures_are_small(fixtures_dir):
    assert sum(p.stat().st_size for p in fixtures_dir.rglob("*") if p.is_file()) < 20 * 2**20


def test_fixtures_regenerate(fixtures_dir, tmp_path):
    """Byte for byte where this machine computes like the recording one (same torch, CPU kernel
    level, threads); elsewhere the same files, answers and losses to float rounding."""
    from energydiag.reference.fixtures import recorded_steps

    ticks = []
    write_fixtures(tmp_path, progress=lambda: ticks.append(1))
    assert len(ticks) == recorded_steps() == 320  # the demo's bar: one tick a recorded step
    for name in RECIPES:
        recorded, fresh = Run(fixtures_dir / name), Run(tmp_path / name)
        if not differences(recorded.manifest.environment, capture()):
            assert digest(tmp_path / name) == digest(fixtures_dir / name), name
            continue
        assert set(digest(tmp_path / name)) == set(digest(fixtures_dir / name)), name
        assert (tmp_path / name / "expected.json").read_text() == (
            fixtures_dir / name / "expected.json"
        ).read_text()
        old, new = recorded.logged(), fresh.logged()
        assert old.keys() == new.keys()
        for step, value in old.items():
            assert value == pytest.approx(new[step], rel=1e-3, nan_ok=True), (name, step)


def test_stalled_fixture_answers(fixtures_dir):
    from energydiag.analyses.curve_sources import curve_report
    from energydiag.analyses.diagnosis import diagnose
    from energydiag.analyses.inspection import inspect

    expected = json.loads((fixtures_dir / "stalled" / "expected.json").read_text())
    run = Run(fixtures_dir / "stalled")
    batch = inspect(fixtures_dir / "stalled" / "checkpoints" / "step-00000060.safetensors").batch
    assert (batch.batch_size, batch.tau) == (expected["batch_size"], expected["tau"])
    assert expected["head"] in batch.head["source"]
    assert batch.bounds["head"]["floor"] == pytest.approx(expected["floor"])
    assert batch.bounds["head"]["chance"] == pytest.approx(expected["chance"])
    assert curve_report(run.root).plateau_on == expected["plateau_level"]
    assert diagnose(run).verdict == expected["diagnosis"]


def test_nan_fixture_answers(fixtures_dir):
    from energydiag.analyses.diagnosis import diagnose

    expected = json.loads((fixtures_dir / "nan" / "expected.json").read_text())
    fault = diagnose(Run(fixtures_dir / "nan")).fault
    assert fault.step == expected["first_nonfinite_step"]
    assert (fault.phase, fault.module) == (expected["phase"], expected["module"])
    assert fault.op.op == expected["op"]
    assert fault.all_masked_samples == [expected["sample"]]


def test_healthy_fixture_answers(fixtures_dir):
    from energydiag.analyses.diagnosis import diagnose

    result = diagnose(Run(fixtures_dir / "healthy"))
    assert result.verdict == "healthy" and result.findings == []
    assert result.loss_end < result.loss_start  # expected: loss_falls
