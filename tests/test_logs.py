"""Logs as people have them (issue 16): every TensorBoard event file of a folder, v2 tensor
summaries, restarts merged by step; a local W&B run's history; W&B history exports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from energydiag.errors import DiagError
from energydiag.io.metrics import load_metrics, metric_series


def writer(folder):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def test_tensorboard_v2_tensor_scalars_are_read(tmp_path):
    w = writer(tmp_path)
    for step in range(6):
        w.add_scalar("loss", 2.0 - step / 10, step, new_style=True)  # a tensor summary
    w.add_scalar("loss", math.inf, 6, new_style=True)
    w.close()
    steps, values = metric_series(load_metrics(tmp_path), "loss")
    assert steps.tolist() == list(range(7))
    assert values[:6] == pytest.approx([2.0 - s / 10 for s in range(6)]) and values[6] == math.inf


def test_every_event_file_merges_by_step(tmp_path):
    first = writer(tmp_path)  # the first attempt: steps 0-9, crashed after step 9
    for step in range(10):
        first.add_scalar("loss", 3.0, step)
    first.close()
    time.sleep(1.1)  # event file names carry the second they were opened
    second = writer(tmp_path)  # the restart from the step-5 checkpoint, in v2 format
    for step in range(5, 15):
        second.add_scalar("loss", 1.0, step, new_style=True)
    second.close()
    val = writer(tmp_path / "val")
    val.add_scalar("loss", 0.5, 10)
    val.close()
    frame = load_metrics(tmp_path)
    steps, values = metric_series(frame, "loss")
    assert steps.tolist() == list(range(15))
    assert values.tolist() == [3.0] * 5 + [1.0] * 10  # the restart's values win
    assert metric_series(frame, "val/loss")[0].tolist() == [10]


def test_a_corrupt_event_file_is_named(tmp_path):
    w = writer(tmp_path)
    w.add_scalar("loss", 1.0, 0)
    w.close()
    (bad := tmp_path / "sub" / "events.out.tfevents.0.host").parent.mkdir()
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(DiagError) as err:
        load_metrics(tmp_path)
    assert str(bad) in str(err.value)


WANDB_SCRIPT = """
import math, sys, wandb
run = wandb.init(project="p", dir=sys.argv[1], config={"tau": 0.5})
for step in range(6):
    run.log({"loss": 2.0 - step / 10, "train/grad_norm": math.nan if step == 4 else 1.0})
run.log({"loss": 1.0, "note": "text is skipped"}, step=9)
run.finish()
"""


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    pytest.importorskip("wandb")
    folder = tmp_path_factory.mktemp("wb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-c", WANDB_SCRIPT, str(folder)], env=env, check=True)
    return folder / "wandb"


def test_local_wandb_run_history(wandb_run):
    (run_file,) = wandb_run.glob("offline-run-*/run-*.wandb")
    for source in (wandb_run, run_file.parent, run_file):  # wandb/, the run folder, the file
        frame = load_metrics(source)
        steps, loss = metric_series(frame, "loss")
        assert steps.tolist() == [0, 1, 2, 3, 4, 5, 9]
        assert loss.tolist() == pytest.approx([2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.0])
        norm_steps, norm = metric_series(frame, "train/grad_norm")
        assert norm_steps.tolist() == [0, 1, 2, 3, 4, 5] and math.isnan(norm[4])
        assert "note" not in frame.columns


def test_truncated_wandb_file_keeps_whole_records_and_corruption_is_named(wandb_run, tmp_path):
    (run_file,) = wandb_run.glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    cut = tmp_path / "run-cut.wandb"
    cut.write_bytes(data[: len(data) - 20])  # killed mid-write
    assert len(metric_series(load_metrics(cut), "loss")[0]) >= 5
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (bad := tmp_path / "run-bad.wandb").write_bytes(bytes(flipped))
    with pytest.raises(DiagError, match="corrupt record at byte"):
        load_metrics(bad)
    (text := tmp_path / "run-text.wandb").write_text("hello")
    with pytest.raises(DiagError, match="not a W&B run file"):
        load_metrics(text)


def test_wandb_history_exports(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"_step": 0, "loss": 2.0}, {"_step": 1, "acc": 0.1}, {"_step": 2, "loss": math.nan}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "history.parquet")
    steps, loss = metric_series(load_metrics(tmp_path / "history.parquet"), "loss")
    assert steps.tolist() == [0, 2] and loss[0] == 2.0 and math.isnan(loss[1])  # null ≠ NaN
    (tmp_path / "history.json").write_text(json.dumps(rows).replace("NaN", "NaN"))
    steps, loss = metric_series(load_metrics(tmp_path / "history.json"), "loss")
    assert steps.tolist() == [0, 2] and math.isnan(loss[1])


def test_tensorboard_tags_logged_at_other_steps_are_missing_there_not_nan(tmp_path):
    """Streamed into arrays: a tag not logged at a step is missing there, a logged NaN is a
    value, and a step written twice in one file keeps its later write."""
    w = writer(tmp_path)
    for step in range(5):
        w.add_scalar("loss", 2.0 - step / 10, step)
    w.add_scalar("grad_norm", 1.0, 0)
    w.add_scalar("grad_norm", math.nan, 2)
    w.add_scalar("loss", 9.0, 4)  # step 4 again: the later write wins
    w.close()
    frame = load_metrics(tmp_path)
    steps, values = metric_series(frame, "grad_norm")
    assert steps.tolist() == [0, 2] and values[0] == 1.0 and math.isnan(values[1])
    assert metric_series(frame, "loss")[1].tolist() == pytest.approx([2.0, 1.9, 1.8, 1.7, 9.0])
