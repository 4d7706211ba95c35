"""Runs that outgrow one process (issue 15), on CPU with gloo: what they leave on disk is read
by one process, and multi-rank runs replay through the real collectives."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from energydiag.errors import DiagError
from energydiag.io.torchfiles import discover, open_reader
from energydiag.report.console import command_line

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(
        not __import__("torch").distributed.is_gloo_available(), reason="no gloo backend"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_checkpoints(tmp_path_factory):
    import dist_workers

    out = tmp_path_factory.mktemp("fsdp")
    dist_workers.spawn(2, dist_workers.fsdp_with_dcp_checkpoints, str(out), 6)
    return out


def test_fsdp_dcp_checkpoint_is_read_whole_from_its_shards(fsdp_checkpoints):
    step0 = fsdp_checkpoints / "step-0"
    assert len(list(step0.glob("*.distcp"))) == 2  # one shard file per rank
    with open_reader(step0) as reader:
        weight = reader.get("model.0.weight")
        assert tuple(weight.shape) == (16, 8)  # both ranks' rows, assembled
        assert not reader.get("optim.0.weight.exp_avg").any()  # get_state_dict's zero state
    with open_reader(fsdp_checkpoints / "step-2") as reader:
        assert tuple(reader.get("optim.0.weight.exp_avg").shape) == (16, 8)


def test_fsdp_run_is_inspected_and_bisected_from_disk(fsdp_checkpoints):
    from energydiag.analyses.bisection import bisect_checkpoints
    from energydiag.analyses.checkpoint_report import checkpoint_report
    from energydiag.analyses.timeline import timeline

    found = discover(fsdp_checkpoints, "step-{step}")
    assert list(found) == [0, 2, 4, 6, 8, 10]
    assert checkpoint_report(found[0]).findings == []
    assert checkpoint_report(found[10]).stats.tensors  # statistics per tensor, as safetensors
    rows = {r.step: r for r in timeline(found).rows}
    assert not rows[6].exploded and rows[8].exploded  # the lr jump at step 6 shows at 8
    result = bisect_checkpoints(found, predicate="any")
    assert result.first_bad_checkpoint == 8 and result.last_good_checkpoint == 6
    assert result.checkpoint_evaluations < len(found)


def test_missing_and_truncated_shards_are_one_line(fsdp_checkpoints, tmp_path):
    import shutil

    copy = tmp_path / "step-2"
    shutil.copytree(fsdp_checkpoints / "step-2", copy)
    shard = sorted(copy.glob("*.distcp"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DiagError, match="truncated shard") as err, open_reader(copy) as reader:
        for name in reader.names:
            reader.get(name)
    assert str(shard) in str(err.value)
    shard.unlink()
    with pytest.raises(DiagError, match="missing shard"), open_reader(copy) as reader:
        for name in reader.names:
            reader.get(name)
    from typer.testing import CliRunner

    from energydiag.cli import app

    result = CliRunner().invoke(app, ["inspect", str(copy)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "missing shard" in result.stderr


def test_dcp_metadata_that_is_not_dcp_is_refused_without_running_it(tmp_path):
    import pickle

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(print))  # a global outside the allowlist
    with pytest.raises(DiagError, match="refused to load builtins.print"), open_reader(folder):
        pass


def record_ddp(root, plant_step=-1, loss="inbatch_infonce", sharded=False, world=2):
    import dist_workers

    dist_workers.spawn(world, dist_workers.ddp_recorded, str(root), plant_step, loss, sharded)


@pytest.fixture(scope="module")
def planted_on_rank_1(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted") / "run"
    record_ddp(root, plant_step=5)
    return root


def test_ddp_run_replays_bit_exact_and_localises_rank_1s_nan_on_rank_1(planted_on_rank_1):
    """One recording and one launch: steps 0-4 replay to identical parameters on both ranks,
    and the NaN planted on rank 1 at step 5 is found on rank 1."""
    from energydiag.analyses.rank_replay import replay_ranks
    from energydiag.io.rundir import Run

    run = Run(planted_on_rank_1)
    assert run.manifest.format == "energydiag/2"
    assert run.manifest.distributed == {
        "world_size": 2,
        "backend": "gloo",
        "parallelism": "ddp",
        "sync": {"": "ddp"},
    }
    assert len(list((planted_on_rank_1 / "batches").glob("*.rank-1.safetensors"))) == 8
    assert Run(planted_on_rank_1, rank=1).batch_steps == list(range(8))
    failure = json.loads((planted_on_rank_1 / "failure.json").read_text())
    assert failure["step"] == 5 and failure["loss_ranks"] == [1]
    assert failure["ranks"] == [0, 1]  # DDP's all-reduce carried rank 1's NaN to rank 0
    seen_by_1 = json.loads((planted_on_rank_1 / "failure.rank-1.json").read_text())
    assert seen_by_1["step"] == 5 and seen_by_1["loss"] != seen_by_1["loss"]  # its own NaN loss
    report = replay_ranks(str(planted_on_rank_1), 0, None, nproc=2).to_json()
    assert report["placement"].startswith("2 ranks ran as CPU")
    assert [r["bit_exact"] for r in report["ranks"]] == [True, True]
    # exact here, but not promised: the rebuilt reducer may sum the ranks in another order
    assert report["fidelity"]["expected"] == "approximate"
    assert any(e.startswith("all-reduce order (DDP") for e in report["fidelity"]["environment"])
    checks = report["fidelity"]["parameter_checks"]  # checkpoint 4, and the dump before step 5
    assert [(c["step"], c["max_abs_diff"]) for c in checks] == [(4, 0.0), (5, 0.0)]
    fault = report["fault"]
    assert (fault["rank"], fault["step"], fault["phase"]) == (1, 5, "forward")
    assert fault["module"] == "attn" and fault["op"]["op"] == "aten::_softmax"
    assert fault["all_masked_samples"] == [2]


def test_replay_command_launches_the_ranks(planted_on_rank_1):
    from typer.testing import CliRunner

    from energydiag.cli import app

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    result = CliRunner().invoke(
        app, ["replay", str(planted_on_rank_1), "--from-step", "4", "--json"]
    )
    assert result.exit_code == 1
    # the launcher's own SIGTERM handler would outlive it and make a test session unstoppable
    assert handlers == {sig: signal.getsignal(sig) for sig in handlers}
    assert json.loads(result.stdout)["fault"]["rank"] == 1
    wrong = CliRunner().invoke(app, ["replay", str(planted_on_rank_1), "--nproc", "3"])
    assert wrong.exit_code == 2 and "recorded by 2 rank(s)" in wrong.stderr


def test_diagnose_replays_a_multi_rank_run_on_its_ranks(planted_on_rank_1):
    from energydiag.analyses.diagnosis import diagnose
    from energydiag.io.rundir import Run

    result = diagnose(Run(planted_on_rank_1))
    assert result.verdict == "non-finite"
    assert (result.fault.rank, result.fault.step, result.fault.module) == (1, 5, "attn")
    assert {"ranks.negatives", "ranks.first_nonfinite"} <= {f.code for f in result.findings}


def test_every_ranks_log_says_which_rank_went_first(planted_on_rank_1):
    """Rank 0's log alone dates rank 1's NaN a step late: its loss at 5 is still finite, its
    gradient norm (after the all-reduce) is not."""
    from typer.testing import CliRunner

    from energydiag.cli import app

    result = CliRunner().invoke(app, ["curves", str(planted_on_rank_1), "--json"])
    data = json.loads(result.stdout)
    firsts = [
        (r["rank"], r["first_nonfinite_loss"], r["first_nonfinite_grad_norm"])
        for r in data["ranks"]
    ]
    assert firsts == [(0, 6, 5), (1, 5, 5)]
    (found,) = [f for f in data["findings"] if f["code"] == "ranks.first_nonfinite"]
    assert found["title"].startswith("rank 1's own loss went non-finite first, at step 5")
    assert (
        "rank 0 received it through the all-reduce (gradient norm at step 5, loss at step 6)"
        in (found["title"])
    )


def test_bisect_on_a_multi_rank_run_points_to_the_rank_replay(planted_on_rank_1):
    from energydiag.analyses.bisection import bisect
    from energydiag.io.rundir import Run

    result = bisect(Run(planted_on_rank_1))
    assert result.unresolved["advice"].startswith("replay the interval on the run's 2 ranks")
    assert "from step 5" in result.unresolved["advice"]
    (found,) = [f for f in result.findings if f.code == "bisect.unresolved"]
    assert command_line(found.commands[0]) == "energydiag replay RUN --from-step 5 --to-step 5"


def test_under_torchrun_energydiag_is_one_of_the_ranks(planted_on_rank_1):
    """The user's own torchrun: no second launch, rank 0 prints the report."""
    exe = Path(sys.executable).with_name("energydiag")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "--no-python",
        str(exe),
        "replay",
        str(planted_on_rank_1),
        "--from-step",
        "4",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout[done.stdout.index("{") :])
    assert report["fault"]["rank"] == 1 and report["placement"] is None


def test_manifest_versions(tmp_path):
    from energydiag.io.manifest import parse_manifest

    base = {
        "model": {"target": "m:f"},
        "loss": {"name": "inbatch_infonce"},
        "optimizer": {"name": "AdamW"},
    }
    ddp = {"world_size": 2, "backend": "gloo", "parallelism": "ddp"}
    assert parse_manifest({**base, "format": "energydiag/1"}, "x").world_size == 1
    assert (
        parse_manifest({**base, "format": "energydiag/2", "distributed": ddp}, "x").world_size == 2
    )
    with pytest.raises(DiagError, match="does not match distributed"):
        parse_manifest({**base, "format": "energydiag/2"}, "x")
    with pytest.raises(DiagError, match="distributed must be null"):
        parse_manifest(
            {**base, "format": "energydiag/2", "distributed": {**ddp, "world_size": 0}}, "x"
        )


def test_gathered_negatives_replay_through_the_real_all_gather(tmp_path):
    from energydiag.analyses.rank_replay import replay_ranks

    record_ddp(tmp_path / "run", loss="gathered_infonce")
    report = replay_ranks(str(tmp_path / "run"), 0, None, nproc=2).to_json()
    assert report["fault"] is None and [r["bit_exact"] for r in report["ranks"]] == [True, True]
    negatives = next(f for f in report["findings"] if f["code"] == "ranks.negatives")
    assert negatives["evidence"] == {
        "local_batch": 4,
        "world_size": 2,
        "negatives": 7,
        "gathered": True,
        "synchronised": True,
    }


def test_gathered_loss_meets_every_ranks_actions(tmp_path):
    """Without a gather the same loss is plain swap InfoNCE: the two agree in one process."""
    import torch
    from handloop import SMALL

    from energydiag.reference.losses import gathered_infonce, inbatch_infonce
    from energydiag.reference.models import EnergyModel
    from energydiag.reference.synthetic import Task, batches

    torch.manual_seed(0)
    model, batch = EnergyModel(**SMALL), next(batches(Task(batch=4), seed=1))
    gathered, diagnostics = gathered_infonce(model, batch)
    assert torch.equal(gathered, inbatch_infonce(model, batch)[0])
    assert tuple(diagnostics["candidate_energies"].shape) == (4, 4)


def test_fsdp_run_records_dcp_checkpoints_replays_them_and_localises_rank_1(tmp_path):
    """One FSDP recording with a NaN planted on rank 1 at step 5, one launch: DCP checkpoints
    (the collective pre-step dump included), a bit-exact replay through DCP loading up to it,
    and the fault on rank 1."""
    from energydiag.analyses.rank_replay import replay_ranks
    from energydiag.io.rundir import Run

    record_ddp(tmp_path / "run", plant_step=5, sharded=True)
    run = Run(tmp_path / "run")
    assert run.manifest.distributed["parallelism"] == "fsdp"
    assert run.manifest.parallelize == "dist_workers:shard"
    assert run.checkpoint_steps == [0, 4, 5]  # 5: the pre-step dump of the failure
    assert (tmp_path / "run" / "checkpoints" / "step-00000005" / ".metadata").is_file()
    assert len(list((tmp_path / "run" / "checkpoints" / "step-00000004").glob("*.distcp"))) == 2
    assert tuple(run.checkpoint(4).model["act_in.weight"].shape)  # whole tensors, from shards
    report = replay_ranks(str(tmp_path / "run"), 0, None, nproc=2).to_json()
    assert [r["bit_exact"] for r in report["ranks"]] == [True, True]
    checks = report["fidelity"]["parameter_checks"]  # checkpoint 4, and the dump before step 5
    assert [(c["step"], c["max_abs_diff"]) for c in checks] == [(4, 0.0), (5, 0.0)]
    fault = report["fault"]
    assert (fault["rank"], fault["step"], fault["phase"]) == (1, 5, "forward")
    assert fault["module"] == "attn" and fault["op"]["op"] == "aten::_softmax"
    # one process plays both recorded ranks, the checkpoints resharded by DCP's own loading
    alone = replay_ranks(str(tmp_path / "run"), 4, None, nproc=1).to_json()
    assert alone["placement"].startswith("2 recorded ranks played by 1 process(es)")
    assert any("FSDP's reduce-scatter" in e for e in alone["fidelity"]["environment"])
    fault = alone["fault"]
    assert (fault["rank"], fault["step"], fault["phase"], fault["module"]) == (
        1,
        5,
        "forward",
        "attn",
    )


def test_a_rank_that_fails_is_one_line(planted_on_rank_1, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from energydiag.cli import app

    run = tmp_path / "run"
    shutil.copytree(planted_on_rank_1, run)
    ckpt = run / "checkpoints" / "step-00000004.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    result = CliRunner().invoke(app, ["replay", str(run), "--from-step", "4"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert re.search(r"replay rank [01] failed: .*not a readable safetensors", line)  # both fail
    assert ckpt.name in line
    late = CliRunner().invoke(app, ["replay", str(run), "--to-step", "99"])
    assert late.exit_code == 2 and "the last logged batch is step 7" in late.stderr
