"""Trainer callbacks (issue 16): a tiny model trained for a few steps by Lightning and by the
Hugging Face Trainer, recorded by the callback alone, must replay bit-exact; a planted
zero-variance sample must be dumped and localised to its step, module and op."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_models import hf_arguments, regression_data

from energydiag.analyses.replaying import replay_report
from energydiag.io.rundir import Run

BATCH = 8


def fit_lightning(
    root,
    steps: int,
    constant_row: int | None = None,
    ramp: float = 0.0,
    trainer_args: dict | None = None,
    seed: int = 0,
    spike_row: int | None = None,
    rows: int = 96,
    **options,
):
    pl = pytest.importorskip("lightning.pytorch")
    from lit_models import LitRegressor, quiet_trainer

    from energydiag.record.lightning import EnergydiagCallback

    pl.seed_everything(seed, verbose=False)
    x, y = regression_data(rows, constant_row, 3 + seed, spike_row)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    callback = EnergydiagCallback(root, checkpoint_every=4, persist_batches=True, **options)
    trainer = quiet_trainer(
        max_steps=steps,
        callbacks=[callback],
        **({"gradient_clip_val": 1.0} | (trainer_args or {})),
    )
    trainer.fit(LitRegressor(ramp=ramp), loader)
    return callback


def test_lightning_run_replays_bit_exact(tmp_path):
    fit_lightning(tmp_path / "run", steps=10)
    run = Run(tmp_path / "run")
    assert run.manifest.model.target == "lit_models:LitRegressor"
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
    # the path from the LightningModule, though its training_step never calls its forward
    assert fault.module == "net.norm" and fault.op.op == "aten::div"


def test_lightning_refuses_what_it_cannot_replay(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from lit_models import LitRegressor, quiet_trainer

    from energydiag.errors import DiagError
    from energydiag.record.lightning import EnergydiagCallback

    x, y = regression_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = quiet_trainer(
        max_steps=2,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="value",
        callbacks=[EnergydiagCallback(tmp_path / "run")],
    )
    with pytest.raises(DiagError, match="gradient_clip_algorithm='value'"):
        trainer.fit(LitRegressor(), loader)


def fit_hf(
    root,
    steps: int,
    constant_row: int | None = None,
    max_grad_norm: float = 1.0,
    ramp: float = 0.0,
    output_dir=None,
    seed: int = 0,
    spike_row: int | None = None,
    on_alarm: str = "warn",
    rows: int = 96,
    scaler: torch.amp.GradScaler | None = None,
    **arguments,
):
    """``scaler`` stands in for the GradScaler accelerate makes for ``fp16=True`` on a GPU only:
    with it (and ``fp16=True``) a CPU run takes the GPU's path, float16 autocast included."""
    transformers = pytest.importorskip("transformers")
    from trainer_models import RegressionSet, Regressor, lr_ramp

    from energydiag.record.hf import EnergydiagCallback

    transformers.set_seed(seed)
    spec = {"target": "trainer_models:Regressor", "kwargs": {"hidden": 16, "dropout": 0.1}}
    callback = EnergydiagCallback(
        root, model_spec=spec, checkpoint_every=4, persist_batches=True, on_alarm=on_alarm
    )
    args = hf_arguments(
        output_dir or root.parent / "hf-out",
        steps,
        BATCH,
        learning_rate=1e-2,
        weight_decay=0.01,
        max_grad_norm=max_grad_norm,
        dataloader_num_workers=0,
        seed=seed,
        **arguments,
    )
    x, y = regression_data(rows, constant_row, 3 + seed, spike_row)
    model = Regressor()
    optimizers = (None, None)
    if ramp:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        optimizers = (optimizer, lr_ramp(optimizer, ramp))
    trainer = transformers.Trainer(
        model, args, train_dataset=RegressionSet(x, y), callbacks=[callback], optimizers=optimizers
    )
    if scaler is not None:
        trainer.accelerator.scaler, trainer.accelerator.native_amp = scaler, True
    trainer.train()
    return callback, trainer


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
    args = hf_arguments(tmp_path / "hf-out", 4, 8)
    callback = EnergydiagCallback(tmp_path / "run", checkpoint_every=2, persist_batches=True)
    model = transformers.GPT2LMHeadModel(config)
    transformers.Trainer(model, args, train_dataset=data, callbacks=[callback]).train()
    run = Run(tmp_path / "run")
    assert run.manifest.model.target == "energydiag.record.hf:from_config"
    assert run.manifest.model.kwargs["config"]["n_embd"] == 16
    report = replay_report(run, 0)
    assert report.fault is None and report.fidelity["bit_exact"]


def first_nonfinite(root) -> int | None:
    import math

    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    judged = [
        (r["step"], [v for k, v in r.items() if k == "loss" or k.endswith("grad_norm")])
        for r in rows
    ]
    return next((step for step, values in judged if not all(map(math.isfinite, values))), None)


def alerts(root) -> list[dict]:
    path = root / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_lightning_accumulation_is_recorded_and_replays_bit_exact(tmp_path):
    """12 batches an epoch in windows of 5: 5, 5, then a short 2 (Lightning still divides by 5);
    4 optimizer steps cross into the second epoch."""
    fit_lightning(tmp_path / "run", steps=4, trainer_args={"accumulate_grad_batches": 5})
    run = Run(tmp_path / "run")
    assert run.manifest.step == "energydiag.record.accumulation:accumulated_step"
    window = run.batch(2).tensors
    assert sorted({k.split(".")[1] for k in window if k.startswith("micro.")}) == ["0", "1"]
    assert float(window["energydiag.divisor"]) == 5.0
    assert int(window["micro.1.lightning.batch_idx"]) == 11
    report = replay_report(run, 0)
    assert report.fault is None and report.fidelity["bit_exact"]
    assert report.fidelity["compared"] == 4


def test_hf_accumulation_is_recorded_and_replays_bit_exact(tmp_path):
    """The Trainer's windows of 5 over 12 batches: 5, 5, 2, divided by 5, 5 and 2."""
    fit_hf(tmp_path / "run", steps=4, gradient_accumulation_steps=5)
    run = Run(tmp_path / "run")
    divisors = [float(run.batch(s).tensors["energydiag.divisor"]) for s in range(4)]
    assert divisors == [5.0, 5.0, 2.0, 5.0]
    assert {"micro.4.x", "micro.4.labels"} <= set(run.batch(0).tensors)
    report = replay_report(run, 0)
    assert report.fault is None and report.fidelity["bit_exact"]


def test_hf_refuses_accumulation_for_a_model_that_scales_its_own_loss(tmp_path):
    transformers = pytest.importorskip("transformers")
    from energydiag.errors import DiagError
    from energydiag.record.hf import EnergydiagCallback

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8)
    data = [{"input_ids": torch.zeros(8, dtype=torch.long), "labels": torch.zeros(8)}] * 4
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        gradient_accumulation_steps=2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    model = transformers.GPT2LMHeadModel(config)
    trainer = transformers.Trainer(
        model, args, train_dataset=data, callbacks=[EnergydiagCallback()]
    )
    with pytest.raises(DiagError, match=r"forward takes \*\*kwargs"):
        trainer.train()


def test_lightning_lr_ramp_alarms_in_the_trainer_log_and_defaults_its_run_dir(tmp_path):
    """AdamW under an lr ×1.3 per step from step 10: the callback, given no directory, records
    into the CSV logger's version folder, and the alarm comes before the first non-finite loss
    as a metric of that logger."""
    pl = pytest.importorskip("lightning.pytorch")
    logger = pl.loggers.CSVLogger(tmp_path, name="logs")
    callback = fit_lightning(
        None, steps=200, ramp=1.3, trainer_args={"logger": logger, "default_root_dir": tmp_path}
    )
    root = tmp_path / "logs" / "version_0" / "energydiag"
    assert callback.run_dir == root and (root / "run.json").exists()
    first = alerts(root)[0]
    failed = first_nonfinite(root)
    print(f"lightning lr ramp: first alarm {first['step']} ({first['rule']}), non-finite {failed}")
    assert failed is not None and failed - first["step"] >= 10
    logged = (root.parent / "metrics.csv").read_text().splitlines()[0].split(",")
    assert f"energydiag/alarm/{first['rule']}" in logged
    # a LightningModule without forward, diagnosed from its own training_step
    from energydiag.analyses.diagnosis import diagnose

    found = diagnose(Run(root))
    assert found.fault.step == failed and found.verdict.value == "non-finite"
    assert {"alarms.recorded", "schedule.lr_beyond_configured"} <= {f.code for f in found.findings}


def test_hf_lr_ramp_alarms_in_the_trainer_log_and_defaults_its_run_dir(tmp_path):
    callback, trainer = fit_hf(None, steps=200, ramp=1.3, output_dir=tmp_path / "out")
    root = tmp_path / "out" / "energydiag"
    assert callback.run_dir == root and (root / "run.json").exists()
    first = alerts(root)[0]
    failed = first_nonfinite(root)
    print(f"HF lr ramp: first alarm {first['step']} ({first['rule']}), non-finite {failed}")
    assert failed is not None and failed - first["step"] >= 10
    logged = [e for e in trainer.state.log_history if "energydiag_alarm" in e]
    assert logged[0] == {
        "step": first["step"],
        "energydiag_alarm": first["rule"],
        "message": first["message"],
    }


def test_an_active_wandb_run_gets_each_alarm(monkeypatch, tmp_path):
    """A stand-in ``wandb`` module with an active run: no network, the same calls."""
    import sys
    import types

    import alarm_loops

    sent = []
    run = types.SimpleNamespace(alert=lambda title, text: sent.append((title, text)))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=run))
    alarm_loops.record(tmp_path, 70, hidden=16, spike_at=40, spike=100.0)
    assert sent[0][0] == "energydiag: grad_norm_band" and sent[0][1].startswith("step 40: ")
