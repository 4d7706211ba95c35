import json
import os

import pytest
import torch
from safetensors.torch import save_file

from energydiag.engine.session import open_session
from energydiag.errors import DiagError
from energydiag.io.rundir import Run


def edit_manifest(run_dir, **changes):
    path = run_dir / "run.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "energydiag/9"}, "unknown format version"),
        ({"grad_clip": -1}, "grad_clip"),
        ({"autocast_dtype": "int8"}, "autocast_dtype"),
        ({"surprise": 1}, "unknown key"),
        ({"model": {"target": "nocolon"}}, "model.target"),
    ],
)
def test_bad_manifest_is_one_line_naming_the_file(small_run, change, message):
    edit_manifest(small_run, **change)
    with pytest.raises(DiagError, match=message) as err:
        Run(small_run)
    assert "run.json" in str(err.value) and "\n" not in str(err.value)


def test_truncated_checkpoint(small_run):
    path = small_run / "checkpoints" / "step-00000004.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DiagError, match="step-00000004.safetensors") as err:
        Run(small_run).checkpoint(4)
    assert "truncated" in str(err.value) or "not a readable" in str(err.value)


def test_batch_shape_mismatch(small_run):
    path = small_run / "batches" / "step-00000003.safetensors"
    save_file(
        {"h": torch.zeros(8, 6, 16), "a_pos": torch.zeros(7, 4, 3)},
        str(path),
        metadata={"format": "energydiag/1", "kind": "batch", "step": "3"},
    )
    with pytest.raises(DiagError, match="batch sizes differ"):
        Run(small_run).batch(3)


def test_missing_key_and_wrong_step(small_run):
    path = small_run / "batches" / "step-00000003.safetensors"
    save_file(
        {"h": torch.zeros(8, 6, 16)},
        str(path),
        metadata={"format": "energydiag/1", "kind": "batch", "step": "3"},
    )
    with pytest.raises(DiagError, match="missing tensor 'a_pos'"):
        Run(small_run).batch(3)
    save_file(
        {"h": torch.zeros(8, 6, 16), "a_pos": torch.zeros(8, 4, 3)},
        str(path),
        metadata={"format": "energydiag/1", "kind": "batch", "step": "4"},
    )
    with pytest.raises(DiagError, match="metadata says step"):
        Run(small_run).batch(3)


def test_missing_batches_are_named_as_ranges(small_run):
    for step in (5, 6, 9):
        os.unlink(small_run / "batches" / f"step-{step:08d}.safetensors")
    with pytest.raises(DiagError, match="missing batches for steps 5-6, 9"):
        Run(small_run).require_batches(4, 11)


def test_symlink_escaping_the_run_is_refused(small_run, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(small_run / "checkpoints" / "step-00000008.safetensors", outside)
    os.symlink(outside, small_run / "checkpoints" / "step-00000008.safetensors")
    with pytest.raises(DiagError, match="outside the run directory"):
        Run(small_run).checkpoint(8)


def test_checkpoint_not_matching_model(small_run):
    edit_manifest(
        small_run,
        model={
            "target": "energydiag.reference.models:EnergyModel",
            "kwargs": {"d_context": 16, "d_action": 3, "horizon": 4, "d_model": 16},
        },
    )
    with pytest.raises(DiagError, match="shape mismatch"):
        open_session(Run(small_run), 4, torch.device("cpu"))


def test_no_checkpoint_before_step(small_run):
    os.unlink(small_run / "checkpoints" / "step-00000000.safetensors")
    with pytest.raises(DiagError, match="no checkpoint at or before step 2"):
        Run(small_run).checkpoint_at_or_before(2)


@pytest.mark.parametrize("command", ["replay", "whatif"])
def test_random_bytes_as_rng_state_are_one_line_naming_the_batch(small_run, command):
    """The right dtype and size, but not an mt19937 state: caught when the batch is read."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from energydiag.cli import app
    from energydiag.io.tensorfile import read_metadata

    path = small_run / "batches" / "step-00000005.safetensors"
    tensors, meta = load_file(str(path)), read_metadata(path)
    key = next(k for k in tensors if k.endswith("cpu") and tensors[k].dtype == torch.uint8)
    tensors[key] = torch.randint(
        0, 256, tensors[key].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    save_file(tensors, str(path), metadata=meta)
    args = [command, str(small_run), "--from-step", "4"]
    args += ["--steps", "3", "--try", "lr*=0.5"] if command == "whatif" else []
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2, out.output
    assert "step-00000005.safetensors" in out.output and "generator state" in out.output
