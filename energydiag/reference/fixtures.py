"""The three demo runs (healthy, stalled, nan): recipes, and where ``demo`` finds them.

A source checkout ships them in ``fixtures/``; an installed wheel does not (8 MB of tensors for a
command most users run once), so the first ``demo`` records them into a per-version cache, in
about ten seconds, from these same recipes. Each run gets an ``expected.json`` with the answers
the tests and the demo hold it to.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from energydiag.reference.synthetic import record_run

NAN_STEP, NAN_SAMPLE = 57, 5
CHECKOUT = Path(__file__).resolve().parents[2] / "fixtures"


def mask_every_key(step: int, batch: dict[str, torch.Tensor]) -> None:
    """At NAN_STEP one sample arrives with every context token padded (a real data-pipeline bug)."""
    if step == NAN_STEP:
        batch["pad_mask"][NAN_SAMPLE] = True


RECIPES: dict[str, dict[str, Any]] = {
    "healthy": dict(
        model_kwargs={"head": "softplus", "dropout": 0.02},
        loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.2}},
        lr=3e-3,
        steps=160,
        checkpoint_every=20,
        expected={"diagnosis": "healthy", "loss_falls": True},
    ),
    "stalled": dict(
        model_kwargs={"head": "sigmoid", "head_bias_init": 12.0, "dropout": 0.02},
        loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.5}},
        lr=5e-4,
        steps=80,
        checkpoint_every=20,
        expected={
            "diagnosis": "stalled",
            "batch_size": 8,
            "tau": 0.5,
            "head": "sigmoid",
            "plateau_level": "chance",
            "chance": math.log(8),
            "floor": math.log1p(7 * math.exp(-1 / 0.5)),
            "cause": "pre-sigmoid score near +12: the sigmoid is saturated, energies all sit near 1",
        },
    ),
    "nan": dict(
        model_kwargs={"head": "softplus", "dropout": 0.02},
        loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.2}},
        lr=3e-3,
        steps=80,
        checkpoint_every=10,
        fault=mask_every_key,
        expected={
            "diagnosis": "nan",
            "first_nonfinite_step": NAN_STEP,
            "phase": "forward",
            "module": "attn",
            "op": "aten::_softmax",
            "sample": NAN_SAMPLE,
            "cause": f"sample {NAN_SAMPLE}'s pad_mask masks every key at step {NAN_STEP}",
        },
    ),
}


def write_fixtures(
    out: Path,
    announce: Callable[[Path], None] = lambda _: None,
    progress: Callable[[], None] | None = None,
) -> None:
    """Record every recipe into ``out/<name>``, replacing what is there; ``progress()`` after
    every recorded step (``recorded_steps()`` in all)."""
    for name, recipe in RECIPES.items():
        recipe = dict(recipe)
        expected = recipe.pop("expected")
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        record_run(target, seed=0, progress=progress, **recipe)
        (target / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
        announce(target)


def cache_folder(version: str) -> Path:
    """``$ENERGYDIAG_CACHE`` or the XDG cache, one folder per package version."""
    root = os.environ.get("ENERGYDIAG_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "energydiag"
    )
    return Path(root) / f"fixtures-{version}"


def recorded_steps() -> int:
    """The steps ``write_fixtures`` records, for a progress bar's total."""
    return sum(recipe["steps"] for recipe in RECIPES.values())


def demo_runs(
    version: str,
    announce: Callable[[Path], None] = lambda _: None,
    progress: Callable[[], None] | None = None,
) -> Path:
    """The checkout's fixtures, else the cached ones, recorded first when missing (announced,
    with ``progress()`` after every recorded step)."""
    if (CHECKOUT / "make_fixtures.py").is_file():
        return CHECKOUT
    cached = cache_folder(version)
    if not all((cached / name / "expected.json").is_file() for name in RECIPES):
        announce(cached)
        record_into(cached, progress)
    return cached


def record_into(folder: Path, progress: Callable[[], None] | None = None) -> None:
    """Record the demo runs beside ``folder`` and move them in whole, so that an interrupted
    first run never leaves half a fixture set that a later ``demo`` would trust."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_fixtures(staging, progress=progress)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
