"""Trainer callbacks (issue 16): a tiny model trained for a few steps by Lightning and by the
Hugging Face Trainer, recorded by the callback alone, must replay bit-exact; a planted
zero-variance sample must be dumped and localised to its step, module and op."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_models import regression_data

from energydiag.analyses.replaying import replay_report
from energydiag.io.rundir import Run

BATCH = 8


def fit_lightning(root, steps: int, constant_row: int | None = None, **options):
    pl = pytest.importorskip("lightning.pytorch")
    from trainer_models import LitRegressor

    from energydiag.record.lightning import EnergydiagCallback

    pl.seed_everything(0, verbose=False)
    x, y = regression_data(constant_row=constant_row)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    callback = EnergydiagCallback(root, checkpoint_every=4, persist_batches=True, **options)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(LitRegressor(), loader)
    return callback


def test_lightning_run_replays_bit_exact(tmp_path):
    fit_lightning(tmp_path / "run", steps=10)
    run = Run(tmp_path / "run")
    assert run.manifest.model.target == "trainer_models:LitRegressor"
    assert run.manifest.grad_clip == 1.0 and run.checkpoint_steps == [0, 4, 8]
    lrs = [run.batch(s).hyperparameters[0]["lr"] for s in (3, 4, 9)]
    assert lrs == pytest.approx([1e-2, 5e-3, 2.5e-3])  # the step schedule, recorded per step
    report = replay_report(run, 0)
    assert report.fault is None
    assert report.fidelity["bit_exact"] and report.fidelity["compared"] == 10
    assert [c["max_abs_diff"] for c in report.fidelity["parameter_checks"]] == [0.0, 0.0]


def test_lightning_planted_fault_is_dumped_and_localised(tmp_path):
    # Row 45 is sample 5 of batch 5 (batches of 8, no shuffling).
    fit_lightning(tmp_path / "run", steps=8, constant_row=45)
    failure = json.loads((tmp_path / "run" / "failure.json").read_text())
    assert failure["step"] == 5 and failure["checkpoint"] == 5
    fault = replay_report(Run(tmp_path / "run"), 4).fault
    assert (fault.step, fault.phase) == (5, "forward")
    assert fault.module.endswith("norm") and fault.op.op == "aten::div"


def test_lightning_refuses_what_it_cannot_replay(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from trainer_models import LitRegressor

    from energydiag.errors import DiagError
    from energydiag.record.lightning import EnergydiagCallback

    x, y = regression_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EnergydiagCallback(tmp_path / "run")],
    )
    with pytest.raises(DiagError, match="accumulate_grad_batches=2"):
        trainer.fit(LitRegressor(), loader)


def fit_hf(root, steps: int, constant_row: int | None = None, max_grad_norm: float = 1.0):
    transformers = pytest.importorskip("transformers")
    from trainer_models import RegressionSet, Regressor

    from energydiag.record.hf import EnergydiagCallback

    transformers.set_seed(0)
    spec = {"target": "trainer_models:Regressor", "kwargs": {"hidden": 16, "dropout": 0.1}}
    callback = EnergydiagCallback(root, model_spec=spec, checkpoint_every=4, persist_batches=True)
    args = transformers.TrainingArguments(
        output_dir=str(root.parent / "hf-out"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        weight_decay=0.01,
        max_grad_norm=max_grad_norm,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    x, y = regression_data(constant_row=constant_row)
    trainer = transformers.Trainer(
        Regressor(), args, train_dataset=RegressionSet(x, y), callbacks=[callback]
    )
    trainer.train()
    return callback


def test_hf_trainer_run_replays_bit_exact(tmp_path):
    fit_hf(tmp_path / "run", steps=10)
    run = Run(tmp_path / "run")
    assert set(run.batch(0).tensors) == {"x", "labels"}
    groups = run.batch(5).hyperparameters
    assert len(groups) == 2  # the Trainer's decay / no-decay groups, rebuilt by replay
    assert groups[0]["lr"] < 1e-2 and groups[0]["weight_decay"] != groups[1]["weight_decay"]
    report = replay_report(run, 0)
    assert report.fault is None
    assert report.fidelity["bit_exact"] and report.fidelity["compared"] == 10
    assert [c["max_abs_diff"] for c in report.fidelity["parameter_checks"]] == [0.0, 0.0]


def test_hf_planted_fault_is_dumped_and_localised(tmp_path):
    fit_hf(tmp_path / "run", steps=12, constant_row=45)  # one epoch: the row is seen once
    failure = json.loads((tmp_path / "run" / "failure.json").read_text())
    run = Run(tmp_path / "run")
    bad = failure["step"]
    x = run.batch(bad).tensors["x"]
    assert (x.std(-1) == 0).any() and failure["checkpoint"] == bad  # the Trainer shuffled it here
    fault = replay_report(run, run.checkpoint_at_or_before(bad)).fault
    assert (fault.step, fault.phase) == (bad, "forward")
    assert fault.module == "norm" and fault.op.op == "aten::div"


def test_hf_pretrained_model_needs_no_spec(tmp_path):
    transformers = pytest.importorskip("transformers")
    from energydiag.record.hf import EnergydiagCallback

    transformers.set_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8)
    ids = torch.randint(0, 40, (32, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf-out"),
        max_steps=4,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    callback = EnergydiagCallback(tmp_path / "run", checkpoint_every=2, persist_batches=True)
    model = transformers.GPT2LMHeadModel(config)
    transformers.Trainer(model, args, train_dataset=data, callbacks=[callback]).train()
    run = Run(tmp_path / "run")
    assert run.manifest.model.target == "energydiag.record.hf:from_config"
    assert run.manifest.model.kwargs["config"]["n_embd"] == 16
    report = replay_report(run, 0)
    assert report.fault is None and report.fidelity["bit_exact"]
