"""The runs `diff` and the numerics baseline are tested on: copies of the healthy fixture with
one tensor of one file edited (one ulp, as a changed kernel or commit would move it), or with
act_in summed in two halves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import FIXTURES
from safetensors import safe_open
from safetensors.torch import save_file

STEP = 40  # a checkpoint of the healthy fixture: both sides start from the same weights


def edited_copy(root, source, file: str, key: str, edit):
    """A copy of the run ``source`` whose tensor ``key`` in ``file`` is ``edit(tensor)``."""
    shutil.copytree(source, root)
    path = root / file
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, key: edit(tensors[key].clone())}, path, meta)
    return root


def one_ulp_up(t: torch.Tensor, index: int = 0) -> torch.Tensor:
    t.view(-1)[index] = torch.nextafter(t.view(-1)[index], torch.tensor(float("inf")))
    return t


def perturbed_copy(root, source, step: int):
    """A copy of ``source`` whose act_in.weight[0, 3] is one ulp larger at ``step``."""
    checkpoint = f"checkpoints/step-{step:08d}.safetensors"
    return edited_copy(root, source, checkpoint, "model.act_in.weight", lambda w: one_ulp_up(w, 3))


def split_copy(root: Path) -> Path:
    """The healthy fixture with act_in summed in two halves (trainer_models.SplitLinear)."""
    shutil.copytree(FIXTURES / "healthy", root)
    manifest = json.loads((root / "run.json").read_text())
    manifest["model"]["target"] = "trainer_models:SplitEnergyModel"
    (root / "run.json").write_text(json.dumps(manifest))
    return root
