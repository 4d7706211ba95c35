from __future__ import annotations

import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def small_run(tmp_path: Path) -> Path:
    """A fresh 12-step recorded run with dropout, checkpoints every 4 steps."""
    from energydiag.reference.synthetic import record_run

    record_run(
        tmp_path / "run",
        model_kwargs={"head": "softplus", "dropout": 0.1},
        loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.5}},
        steps=12,
        checkpoint_every=4,
    )
    return tmp_path / "run"


sys.path.insert(0, str(Path(__file__).resolve().parent))  # so manifests can name 'faulty:...'
