import math

import pytest
import torch

from energydiag.analyses.bisection import bisect
from energydiag.errors import DiagError
from energydiag.io.rundir import Run
from energydiag.reference.synthetic import record_run

SMALL = {"d_model": 16, "n_heads": 2, "dropout": 0.1}


def mask_every_key_at(bad_step):
    def fault(step, batch):
        if step == bad_step:
            batch["pad_mask"][1] = True

    return fault


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """128 steps, a checkpoint every 2 (65, plus the Recorder's failure dump at 77)."""
    root = tmp_path_factory.mktemp("long") / "run"
    record_run(root, steps=128, checkpoint_every=2, model_kwargs=SMALL, fault=mask_every_key_at(77))
    return root


def test_finds_exact_first_bad_step_in_log_evaluations(long_run):
    run = Run(long_run)
    n = len(run.checkpoint_steps)
    assert n >= 64
    result = bisect(run)
    assert result.first_bad_step == 77
    assert (result.last_good_checkpoint, result.first_bad_checkpoint) == (76, 77)
    # the first checkpoint (the growth reference), the last, then halving
    assert result.checkpoint_evaluations <= math.ceil(math.log2(n)) + 2
    assert result.fault.phase == "forward" and result.fault.module == "attn"
    assert result.warnings == []


def test_corrupt_checkpoints_are_skipped_not_bad(long_run, tmp_path):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(long_run, root)
    for step in (64, 96, 80):
        path = root / "checkpoints" / f"step-{step:08d}.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    result = bisect(Run(root))
    assert result.first_bad_step == 77
    skipped = [e.step for e in result.evaluations if e.status == "unreadable"]
    assert skipped and set(skipped) <= {64, 80, 96}


def test_unlogged_batches_leave_a_named_unresolved_interval(tmp_path):
    """An lr of inf at step 27 breaks the weights in the optimizer; the loss is NaN from 28, so
    the failure dump at 28 already holds NaN weights and the ring (25..28) cannot reach back to
    checkpoint 20: the interval is named, with what to log."""
    from handloop import train

    def spike(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: math.inf if s == 27 else 1.0)

    root = tmp_path / "run"
    train(
        root, steps=40, checkpoint_every=10, keep_batches=4, persist_batches=False, scheduler=spike
    )
    result = bisect(Run(root))
    assert (result.last_good_checkpoint, result.first_bad_checkpoint) == (20, 28)
    assert result.first_bad_step is None
    assert result.unresolved["missing_batches"] == "20-24"
    assert "keep_batches>=8" in result.unresolved["advice"]
    # the recorded schedule names the cause even though no replay reaches it
    assert [f.code for f in result.findings] == ["schedule.jump", "bisect.unresolved"]
    assert result.findings[0].evidence["jumps"][0]["step"] == 27


def test_a_failure_dump_localises_the_step_without_the_interval(tmp_path):
    """Batches 20..23 were never kept, but the dump at 27 holds the pre-step state of step 27."""
    root = tmp_path / "run"
    record_run(
        root,
        steps=40,
        checkpoint_every=10,
        model_kwargs=SMALL,
        fault=mask_every_key_at(27),
        persist_batches=False,
        keep_batches=4,
    )
    result = bisect(Run(root))
    assert (result.last_good_checkpoint, result.first_bad_checkpoint, result.first_bad_step) == (
        20,
        27,
        27,
    )
    assert result.fault.module == "attn" and result.changed_outside_steps is None


def test_non_monotone_run_reports_earliest_failure_and_warns(tmp_path):
    """A loop that skips the update when the step is non-finite: the run recovers."""
    record_run(
        tmp_path / "run",
        steps=64,
        checkpoint_every=4,
        model_kwargs=SMALL,
        fault=mask_every_key_at(41),
        skip_nonfinite_updates=True,
    )
    result = bisect(Run(tmp_path / "run"))
    assert result.first_bad_step == 41
    assert result.warnings and "non-monotone" in result.warnings[0]
    assert "bisect.non_monotone" in [f.code for f in result.findings]


def test_good_and_bad_bounds_must_be_checkpoints(long_run):
    with pytest.raises(DiagError, match="good 3: no checkpoint"):
        bisect(Run(long_run), good=3)


def test_bounds_narrow_the_search(long_run):
    result = bisect(Run(long_run), good=70, bad=90)
    assert result.first_bad_step == 77
    # --good is read once, as the reference the explosion predicate measures growth against
    assert all(70 <= e.step < 90 for e in result.evaluations)


def test_a_run_without_checkpoints_is_named(small_run):
    for path in (small_run / "checkpoints").iterdir():
        path.unlink()
    with pytest.raises(DiagError, match="no checkpoints to bisect"):
        bisect(Run(small_run))
