"""Loops people really write (issue 13): schedules, their own step function with gradient
accumulation, mixed precision, a GradScaler, and the precision ladder. Every run is recorded by
a hand-written loop; replay must reproduce it and localise what was planted."""

from __future__ import annotations

import torch
from handloop import SMALL, train, train_accumulating

from energydiag import Recorder
from energydiag.analyses.replaying import replay_report
from energydiag.io.rundir import Run
from energydiag.reference.losses import inbatch_infonce
from energydiag.reference.models import EnergyModel
from energydiag.reference.synthetic import Task, batches


def warmup_cosine(optimizer):
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[5])


def test_cosine_schedule_with_warmup_replays_bit_exact(tmp_path):
    root = tmp_path / "run"
    train(root, steps=24, scheduler=warmup_cosine, model_kwargs={"dropout": 0.1})
    run = Run(root)
    lrs = [run.batch(s).hyperparameters[0]["lr"] for s in (0, 4, 5, 23)]
    assert lrs[0] < lrs[1] and lrs[3] < lrs[2]  # the schedule was recorded step by step
    report = replay_report(run, 0)
    fid = report.fidelity
    assert fid["bit_exact"] and fid["compared"] == 24
    assert [c["max_abs_diff"] for c in fid["parameter_checks"]] == [0.0] * 5  # 5, 10, ... 24
    assert report.findings == []


def masking(at_step: int, sample: int):
    """A plant for ``train_accumulating``: every key of one sample of one step masked."""

    def plant(step, batch):
        if step == at_step:
            batch["pad_mask"][sample] = True

    return plant


def test_user_step_with_accumulation_replays_and_names_the_micro_batch(tmp_path):
    clean = tmp_path / "clean"
    train_accumulating(clean)
    assert Run(clean).manifest.step == "faulty:accumulating_step"
    assert replay_report(Run(clean), 0).fidelity["bit_exact"]
    planted = tmp_path / "planted"
    train_accumulating(planted, masking(6, 9))  # sample 9 is in micro-batch 3
    report = replay_report(Run(planted), 4)
    fault = report.fault
    assert (fault.step, fault.phase, fault.micro_batch) == (6, "forward", 3)
    assert fault.module == "attn" and fault.op.op == "aten::_softmax"
    assert "(micro-batch 3)" in report.findings[0].title


def test_bf16_autocast_replays_and_localises_an_overflow(tmp_path):
    def huge(step, model, batch):
        if step == 6:
            with torch.no_grad():
                model.ctx_in.weight[0, 0] = 3e38  # finite in bfloat16, the product is not

    root = tmp_path / "run"
    train(root, steps=9, autocast=torch.bfloat16, plant=huge, checkpoint_every=3)
    run = Run(root)
    assert replay_report(run, 0, to_step=4).fidelity["bit_exact"]  # before the planted edit
    fault = replay_report(run, 6).fault
    assert (fault.step, fault.phase, fault.module) == (6, "forward", "ctx_in")
    assert fault.op.op in ("aten::addmm", "aten::mm", "aten::matmul")
    assert fault.op.detail["dtype_max"] == torch.finfo(torch.bfloat16).max


def scaled_run(root, diverge_at=None):
    """fp16 autocast with a GradScaler that starts far too high, as the default 2**16 can."""
    torch.manual_seed(0)
    model = EnergyModel(**SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    data = batches(Task(), seed=1)
    with Recorder(
        root,
        model=model,
        optimizer=optimizer,
        model_spec={"target": "energydiag.reference.models:EnergyModel", "kwargs": SMALL},
        loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.5}},
        grad_clip=1.0,
        autocast_dtype="float16",
        scaler=scaler,
        checkpoint_every=5,
        persist_batches=True,
    ) as rec:
        for step in range(16):
            batch = next(data)
            if step == diverge_at:
                batch["pad_mask"][1] = True
            rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16):
                loss, _ = inbatch_infonce(model, batch, tau=0.5)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            rec.end_step(loss, grad_norm=norm)
            scaler.step(optimizer)
            scaler.update()


def test_grad_scaler_skips_are_reported_not_failures(tmp_path):
    root = tmp_path / "run"
    scaled_run(root)
    run = Run(root)
    assert run.manifest.scaler["init_scale"] == 2.0**40
    assert not (root / "failure.json").exists()  # the Recorder knew the scaler skips them
    report = replay_report(run, 0)
    assert report.fault is None and report.fidelity["bit_exact"]
    skipped = report.summary().to_dict()["skipped_steps"]
    assert skipped and skipped[0] == {"step": 0, "scale": 2.0**40}
    (note,) = [f for f in report.findings if f.code == "amp.skipped_steps"]
    assert note.severity == "info"


def test_grad_scaler_run_with_a_real_divergence(tmp_path):
    root = tmp_path / "run"
    scaled_run(root, diverge_at=12)
    report = replay_report(Run(root), 10)
    assert report.fault.step == 12 and report.fault.phase == "forward"
    assert report.fault.op.op == "aten::_softmax"


def test_precision_ladder_tells_precision_from_maths(tmp_path):
    def big(step, model, batch):
        if step == 6:
            with torch.no_grad():
                model.act_in.weight[0, 0] = 1e5  # beyond float16, fine in float32

    fp16 = tmp_path / "fp16"
    train(fp16, steps=8, autocast=torch.float16, plant=big, checkpoint_every=3)
    report = replay_report(Run(fp16), 6, ladder=True)
    assert report.ladder.verdict == "precision"
    # float64 cannot be imposed: the model casts its inputs to float32 itself, and says so
    statuses = [r["status"] for r in report.ladder.rungs]
    assert statuses[:2] == ["fails", "finite"] and statuses[2] in ("finite", "not applicable")
    assert "precision.fault" in [f.code for f in report.findings]
    maths = tmp_path / "maths"
    train(maths, steps=3, loss={"target": "faulty:std_of_one_loss", "kwargs": {"tau": 0.5}})
    report = replay_report(Run(maths), 0, ladder=True)
    rungs = [r["status"] for r in report.ladder.rungs]
    assert rungs[:2] == ["fails", "fails"]
    # "in the maths" needs float64 to have failed too; the reference model casts to float32
    # itself, so where that rung cannot run the verdict says precision is not ruled out
    expected = "undecided" if rungs[2] == "not applicable" else "maths"
    assert report.ladder.verdict == expected
    assert f"precision.{expected}" in [f.code for f in report.findings]


def test_compiled_model_replays(tmp_path):
    root = tmp_path / "run"
    train(root, steps=6, model="faulty:compiled_energy_model")
    run = Run(root)
    assert any(k.startswith("_orig_mod.") for k in run.checkpoint(0).model)
    assert replay_report(run, 0).fidelity["compared"] == 6


def test_compiled_model_fault_is_localised_eagerly_and_says_so(tmp_path):
    def mask_all(step, model, batch):
        if step == 3:
            batch["pad_mask"][1] = True

    root = tmp_path / "run"
    train(root, steps=5, model="faulty:compiled_energy_model", plant=mask_all, checkpoint_every=2)
    fault = replay_report(Run(root), 2).fault
    assert (fault.step, fault.phase, fault.module) == (3, "forward", "attn")
    assert any("ran it eagerly" in note for note in fault.notes)


def test_half_precision_findings(tmp_path):
    """Parameters in float16 with Adam's default eps, and an energy gap finer than bfloat16."""
    from energydiag.analyses.inspection import inspect

    torch.manual_seed(0)
    model = EnergyModel(**SMALL).half()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8)
    rec = Recorder(
        tmp_path / "run",
        model=model,
        optimizer=optimizer,
        model_spec={"target": "energydiag.reference.models:EnergyModel", "kwargs": SMALL},
        loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.5}},
        check_spec=False,
    )
    for p in model.parameters():  # any gradient will do: the optimizer state is what is inspected
        p.grad = torch.ones_like(p)
    optimizer.step()
    path = rec.save_checkpoint(1)
    rec.close()
    codes = [f.code for f in inspect(path).findings]
    assert "optimizer.eps_vanishes" in codes
    from energydiag.findings import gap_below_autocast_resolution

    tiny_gap = {"energy_max": 1.0, "energy_min": 0.99, "pos_neg_gap": 1e-3}
    assert (
        gap_below_autocast_resolution("bfloat16", tiny_gap).code == "precision.gap_below_resolution"
    )
    assert gap_below_autocast_resolution("float16", tiny_gap) is None  # 2^-11 resolves 1e-3
