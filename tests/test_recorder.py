import json

import pytest
import torch

from energydiag.engine.session import open_session
from energydiag.errors import DiagError
from energydiag.io.rundir import Run
from energydiag.record.recorder import Recorder
from energydiag.reference.synthetic import Task, batches, record_run


def test_recorded_run_loads_back_identically(tmp_path):
    record_run(tmp_path / "r", steps=6, checkpoint_every=3, model_kwargs={"dropout": 0.1})
    run = Run(tmp_path / "r")
    data = batches(Task(), seed=1)
    for step in range(6):
        expected = next(data)
        got = run.batch(step).tensors
        assert set(got) == set(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    assert run.checkpoint_steps == [0, 3, 6]
    assert list(run.metrics()["step"]) == list(range(6))


def test_replay_from_checkpoint_reproduces_parameters_bit_for_bit(small_run):
    """Replay steps 4..11 from checkpoint 4 and compare with the recorded final checkpoint 12."""
    run = Run(small_run)
    session = open_session(run, 4, torch.device("cpu"))
    logged = run.logged()
    for step in range(4, 12):
        result = session.train(run.batch(step))
        assert result.loss.item() == logged[step]
    final = run.checkpoint(12)
    for name, value in session.model.state_dict().items():
        assert torch.equal(value, final.model[name]), name
    for name, value in final.optim.items():
        param, field = name.rsplit(".", 1)
        state = session.optimizer.state[dict(session.model.named_parameters())[param]]
        assert torch.equal(state[field], value), name


def test_without_rng_restore_dropout_diverges(small_run):
    """Guards the test above: the RNG state is what makes dropout replay exactly."""
    run = Run(small_run)
    session = open_session(run, 4, torch.device("cpu"))
    batch = run.batch(4)
    batch.rng.clear()
    torch.manual_seed(12345)
    result = session.train(batch)
    assert result.loss.item() != run.logged()[4]


def test_failure_dumps_ring_and_pre_step_state(tmp_path):
    def poison(step, batch):
        if step == 9:
            batch["pad_mask"][2] = True

    rec = record_run(
        tmp_path / "r",
        steps=12,
        checkpoint_every=100,
        keep_batches=3,
        persist_batches=False,
        fault=poison,
    )
    run = Run(tmp_path / "r")
    assert rec.failed_at == 9
    assert run.batch_steps == [7, 8, 9]  # bounded by keep_batches
    assert run.checkpoint_steps == [0, 9, 12]
    assert run.failure["step"] == 9 and run.failure["batches_from"] == 7
    assert len(rec.ring) == 3
    pre = run.checkpoint(9)
    assert all(torch.isfinite(t).all() for t in pre.model.values() if t.is_floating_point())
    session = open_session(run, 9, torch.device("cpu"))
    result = session.train(run.batch(9))
    assert torch.isnan(result.loss)


def test_recorder_refuses_to_overwrite(small_run):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(DiagError, match="already holds a run"):
        Recorder(
            small_run,
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            model_spec={"target": "x:y"},
            loss={"name": "margin"},
        )


def test_metrics_are_json_lines(small_run):
    rows = [json.loads(line) for line in (small_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(12))
    assert all({"loss", "grad_norm", "E_pos", "E_neg"} <= set(r) for r in rows)


def test_warm_up_before_optimizer_start_step_replays_exactly(tmp_path):
    """The seed team's loop: the energy optimizer only steps from energy_warm_steps on."""
    from energydiag.analyses.replaying import replay_report
    from energydiag.engine.replay import state_before

    record_run(
        tmp_path / "r",
        steps=10,
        checkpoint_every=3,
        optimizer_start_step=5,
        model_kwargs={"dropout": 0.1},
    )
    run = Run(tmp_path / "r")
    assert run.manifest.optimizer.start_step == 5
    assert torch.equal(
        run.checkpoint(3).model["pred.1.bias"], run.checkpoint(0).model["pred.1.bias"]
    )
    fid = replay_report(run, 3).fidelity
    assert fid["bit_exact"] and fid["compared"] == 7
    final = run.checkpoint(10).model
    session = state_before(run, 10, torch.device("cpu"))
    assert all(torch.equal(v, final[k]) for k, v in session.model.state_dict().items())


def test_model_spec_that_cannot_rebuild_the_model_fails_at_recording(tmp_path):
    from energydiag.reference.models import EnergyModel

    model = EnergyModel(d_context=16, d_action=3, horizon=4)
    with pytest.raises(DiagError, match="does not build the model being trained"):
        Recorder(
            tmp_path / "r",
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            model_spec={
                "target": "energydiag.reference.models:EnergyModel",
                "kwargs": {"d_context": 32, "d_action": 3, "horizon": 4},
            },
            loss={"name": "inbatch_infonce"},
        )


def test_environment_and_hyperparameters_are_recorded(small_run):
    run = Run(small_run)
    env = run.manifest.environment
    assert env["threads"] == torch.get_num_threads() and env["torch"] == torch.__version__
    assert run.batch(3).hyperparameters[0]["lr"] == pytest.approx(3e-3)


def test_replay_from_a_step_without_batches_names_the_nearest(small_run):
    from energydiag.engine.replay import replay

    for step in range(0, 8):
        (small_run / "batches" / f"step-{step:08d}.safetensors").unlink()
    with pytest.raises(DiagError, match="nearest step you can replay from is 8"):
        replay(Run(small_run), 5)


def test_tied_weights_record_and_replay(tmp_path):
    """safetensors refuses two names on one storage; a tied model must still record."""
    from trainer_models import TiedLM, next_token_loss

    from energydiag.analyses.replaying import replay_report

    torch.manual_seed(0)
    model = TiedLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = {"target": "trainer_models:TiedLM", "kwargs": {}}
    with Recorder(
        tmp_path / "run",
        model=model,
        optimizer=optimizer,
        model_spec=spec,
        loss={"target": "trainer_models:next_token_loss"},
        checkpoint_every=3,
        persist_batches=True,
    ) as rec:
        for step in range(6):
            batch = {"ids": torch.randint(0, 20, (4, 6))}
            rec.start_step(step, batch)
            optimizer.zero_grad()
            loss = next_token_loss(model, batch)
            loss.backward()
            rec.end_step(loss)
            optimizer.step()
    ckpt = Run(tmp_path / "run").checkpoint(3)
    assert torch.equal(ckpt.model["emb.weight"], ckpt.model["head.weight"])
    assert replay_report(Run(tmp_path / "run"), 0).fidelity["bit_exact"]
