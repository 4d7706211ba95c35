"""Small things that mislead a new user (issue 12, item 12), each pinned down."""

from __future__ import annotations

import shutil

import torch
from typer.testing import CliRunner

from energydiag.cli import app
from energydiag.engine.environment import recorded_threads

runner = CliRunner()


def test_a_metric_with_one_point_renders(tmp_path):
    log = tmp_path / "one.csv"
    log.write_text("step,loss\n10,2.07\n")
    result = runner.invoke(app, ["curves", str(log)])
    assert result.exit_code == 0 and "1 points" in result.stdout


def test_learning_rate_constant_is_not_a_detached_graph(tmp_path):
    log = tmp_path / "lr.csv"
    log.write_text("step,lr\n" + "".join(f"{s},0.0005\n" for s in range(50)))
    result = runner.invoke(app, ["curves", str(log), "--metric", "lr", "--json"])
    assert result.exit_code == 0 and "detached graph" not in result.stdout


def test_bisect_over_only_unreadable_checkpoints_is_exit_2(small_run):
    for path in (small_run / "checkpoints").iterdir():
        path.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["bisect", str(small_run)])
    assert result.exit_code == 2 and "every checkpoint evaluated is unreadable" in result.stderr


def test_whatif_checks_the_head_path_before_replaying(fixtures_dir, tmp_path):
    run = tmp_path / "stalled"
    shutil.copytree(fixtures_dir / "stalled", run)
    args = ["whatif", str(run), "--from-step", "40", "--steps", "3", "--try", "head=softplus"]
    result = runner.invoke(app, [*args, "--head-path", "no.such"])
    assert result.exit_code == 2 and "--head-path 'no.such'" in result.stderr


def test_a_defaulted_tau_is_stated(fixtures_dir, tmp_path):
    ckpt = tmp_path / "outside-any-run.safetensors"
    shutil.copy(fixtures_dir / "stalled" / "checkpoints" / "step-00000060.safetensors", ckpt)
    batch = fixtures_dir / "stalled" / "batches" / "step-00000060.safetensors"
    model = ["--model", "energydiag.reference.models:EnergyModel", "--model-kwargs"]
    kwargs = '{"d_context": 16, "d_action": 3, "horizon": 4, "head": "sigmoid"}'
    result = runner.invoke(app, ["inspect", str(ckpt), "--batch", str(batch), *model, kwargs])
    assert "defaulted" in result.stdout and "tau 0.5 is assumed" in result.stdout


def test_batch_without_a_model_says_what_is_missing(fixtures_dir, tmp_path):
    ckpt = tmp_path / "alone.safetensors"
    shutil.copy(fixtures_dir / "stalled" / "checkpoints" / "step-00000060.safetensors", ckpt)
    batch = fixtures_dir / "stalled" / "batches" / "step-00000060.safetensors"
    result = runner.invoke(app, ["inspect", str(ckpt), "--batch", str(batch)])
    assert result.exit_code == 2 and "needs a model" in result.stderr


def test_recorded_thread_count_is_applied_and_restored():
    before = torch.get_num_threads()
    with recorded_threads({"threads": 1}):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_runs_recorded_before_the_callbacks_moved_still_resolve():
    """A manifest written by an older callback names energydiag.integrations.*."""
    from energydiag.engine.registry import resolve
    from energydiag.record.batches import tensors_only

    assert resolve("energydiag.integrations.batches:tensors_only", "loss") is tensors_only


def test_a_multi_rank_replay_expects_the_all_reduce_order_to_differ():
    from energydiag.engine.ranks import collective_order

    assert collective_order(None) == [] and collective_order({"world_size": 1}) == []
    (ddp,) = collective_order({"world_size": 8, "parallelism": "ddp"})
    (fsdp,) = collective_order({"world_size": 2, "parallelism": "fsdp"})
    assert ddp.startswith("all-reduce order (DDP's buckets") and "reduce-scatter" in fsdp
