from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# Piped output takes $COLUMNS; the rendered-output tests read 120-column tables wherever they run
# (pytest-xdist workers inherit a terminal's width, or 80).
os.environ["COLUMNS"] = "120"
if os.environ.get("PYTEST_XDIST_WORKER"):  # one intra-op thread per worker: no oversubscription
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def _command_built_once() -> None:
    """typer builds the click command from every function's signature on each
    ``CliRunner.invoke``: 13 ms, 30 with coverage, a third of the fuzz cases' time. The command
    is the same each time (the callbacks look up their modules' functions when they run), so
    the tests build it once per app, as ``energydiag`` does once per process."""
    import functools

    import typer.main
    import typer.testing

    typer.testing._get_command = functools.cache(typer.main.get_command)


_command_built_once()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under xdist each worker takes whole modules (``--dist loadscope``) in the order they are
    collected. The few modules marked ``heavy`` (ranks in processes, wheels, whole stories: most
    of a minute each) go first, so that neither worker ends the suite running one of them alone
    while the other is idle; the many small ones then even out the finish."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


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
