"""Both trainers' own DDP, recorded as DDP (issue 24, item 7): two gloo ranks joined as
torchrun joins them, each trainer's DistributedSampler giving each rank its share of the rows,
and a std-0 row planted where only one rank reads it."""

from __future__ import annotations

import json
import re

import pytest

from energydiag.analyses.diagnosis import Verdict, diagnose
from energydiag.analyses.rank_replay import replay_ranks
from energydiag.io.rundir import Run

pytestmark = pytest.mark.heavy

PLANTED_ROW = 41  # Lightning's sampler does not shuffle: odd rows are rank 1's, 40-47 step 5
DDP = {"world_size": 2, "backend": "gloo", "parallelism": "ddp", "sync": {"": "ddp"}}


def record(root, trainer: str) -> tuple[Run, Run]:
    """A planted run of 8 steps and a healthy one of 6, in one set of processes (each start
    costs seconds of imports)."""
    import dist_workers

    pytest.importorskip({"lightning": "lightning.pytorch", "hf": "transformers"}[trainer])
    loop = {"lightning": dist_workers.lightning_ddp, "hf": dist_workers.hf_ddp}[trainer]
    planted, healthy = root / "planted", root / "healthy"
    dist_workers.spawn(2, loop, [(str(planted), 8, PLANTED_ROW), (str(healthy), 6, None)])
    return Run(planted), Run(healthy)


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    return record(tmp_path_factory.mktemp("lightning_ddp"), "lightning")


@pytest.fixture(scope="module")
def lightning_planted(lightning_runs):
    return lightning_runs[0]


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    return record(tmp_path_factory.mktemp("hf_ddp"), "hf")


def planted_where(run: Run) -> list[tuple[int, int]]:
    """(rank, step) of every recorded batch holding a std-0 row of features (Lightning's
    batch is the TensorDataset's tuple, HF's the dict its collator makes)."""
    found = []
    for rank in (0, 1):
        ranks_run = Run(run.root, rank=rank)
        for step in ranks_run.batch_steps:
            tensors = ranks_run.batch(step).tensors
            features = tensors.get("x", tensors.get("batch.0"))
            found += [(rank, step)] if (features.std(-1) == 0).any() else []
    return found


def test_lightning_ddp_is_recorded_as_ddp_with_each_ranks_batches(lightning_planted):
    assert lightning_planted.manifest.distributed == DDP
    assert Run(lightning_planted.root, rank=1).batch_steps == list(range(8))
    assert planted_where(lightning_planted) == [(1, 5)]
    failure = json.loads((lightning_planted.root / "failure.json").read_text())
    assert failure["step"] == 5 and failure["loss_ranks"] == [1] and failure["checkpoint"] == 5


def test_lightning_ddp_replays_through_ddp_and_names_rank_1s_module(lightning_planted):
    """Replay calls training_step through DDP's forward, as Lightning does: steps 0-4 replay to
    the recorded parameters on both ranks (their gradients all-reduced), and the NaN is rank 1's,
    in the submodule path of the LightningModule."""
    report = replay_ranks(str(lightning_planted.root), 0, None, nproc=2).to_json()
    assert [r["bit_exact"] for r in report["ranks"]] == [True, True]
    checks = report["fidelity"]["parameter_checks"]
    assert [(c["step"], c["max_abs_diff"]) for c in checks] == [(4, 0.0), (5, 0.0)]
    fault = report["fault"]
    assert (fault["rank"], fault["step"], fault["phase"]) == (1, 5, "forward")
    assert fault["module"] == "net.norm" and fault["op"]["op"] == "aten::div"


def test_one_process_playing_both_lightning_ranks_names_the_same_rank(lightning_planted):
    alone = replay_ranks(str(lightning_planted.root), 4, None, nproc=1).to_json()
    assert alone["placement"].startswith("2 recorded ranks played by 1 process(es)")
    fault = alone["fault"]
    assert (fault["rank"], fault["step"], fault["module"]) == (1, 5, "net.norm")


def test_the_hf_trainers_ddp_is_recorded_as_ddp_and_replays_to_the_planted_row(hf_runs):
    """The Trainer hands callbacks the unwrapped model; the run is still DDP's, and replaying it
    with the all-reduce matches the recorded parameters bit for bit (replaying two unsynced
    copies would not)."""
    run = hf_runs[0]
    assert run.manifest.distributed == DDP
    [(rank, step)] = planted_where(run)  # the sampler shuffled it there; one epoch: once
    failure = json.loads((run.root / "failure.json").read_text())
    assert failure["step"] == step and failure["loss_ranks"] == [rank]
    report = replay_ranks(str(run.root), 0, None, nproc=2).to_json()
    assert [r["bit_exact"] for r in report["ranks"]] == [True, True]
    assert all(c["max_abs_diff"] == 0.0 for c in report["fidelity"]["parameter_checks"])
    fault = report["fault"]
    assert (fault["rank"], fault["step"], fault["phase"]) == (rank, step, "forward")
    assert fault["module"] == "norm" and fault["op"]["op"] == "aten::div"


@pytest.mark.parametrize("trainer", ["lightning", "hf"])
def test_a_healthy_ddp_run_under_either_trainer_comes_out_healthy(request, trainer):
    run = request.getfixturevalue(f"{trainer}_runs")[1]
    assert run.manifest.distributed == DDP and run.first_failure() is None
    found = diagnose(run)
    assert found.verdict == Verdict.HEALTHY and not found.failed


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        ({"fsdp": "full_shard"}, "world_size=2 under FSDP or DeepSpeed"),
        ({"deepspeed": "ds.json"}, "world_size=2 under FSDP or DeepSpeed"),
        ({"world_size": 1, "n_gpu": 2}, "2 GPUs in one process (DataParallel)"),
        ({}, None),  # plain DDP under torchrun: recorded
        ({"fp16": True}, None),  # with accelerate's GradScaler (tests/test_hf_fp16.py)
    ],
)
def test_the_hf_callback_refuses_what_would_not_be_ddp_in_one_line(changes, refused):
    """Stand-in arguments: FSDP, DeepSpeed and DataParallel need GPUs."""
    from types import SimpleNamespace

    from trainer_models import Regressor

    from energydiag.errors import DiagError
    from energydiag.record.hf import _check_supported

    args = {"gradient_accumulation_steps": 1, "world_size": 2, "n_gpu": 0}
    args = SimpleNamespace(**(args | {"fsdp": "", "deepspeed": None} | changes))
    if refused is None:
        _check_supported(args, Regressor())
        return
    prefix = "EnergydiagCallback cannot record a run with "
    with pytest.raises(DiagError, match=f"^{re.escape(prefix + refused)}"):
        _check_supported(args, Regressor())
