"""The energy model watched live (issue 24): a sigmoid head drifting into saturation, a loss
pinned at chance, a loss at the floor its bounded head allows, and Adam's g²/v on a batch unlike
any before, each recorded by a hand-written loop; healthy runs past every rule's warm-up raise
nothing, and watching changes nothing the run computes."""

from __future__ import annotations

import json

import handloop
import pytest
import torch

from energydiag.analyses.early_warning import earliest_alarms
from energydiag.io.metrics import load_metrics

STEPS = 150  # the loss rules judge from step 100, five checks (every 10 steps) in a row


def alerts(root) -> list[dict]:
    path = root / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rows(root) -> list[dict]:
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


def first_of(root) -> dict[str, int]:
    firsts: dict[str, int] = {}
    for alert in alerts(root):
        firsts.setdefault(alert["rule"], alert["step"])
    return firsts


def offline(root) -> dict[str, int]:
    found, _ = earliest_alarms(load_metrics(root / "metrics.jsonl"))
    return {a.rule: a.step for a in found if a.step is not None}


def record(root, **options) -> None:
    handloop.train(root, steps=STEPS, checkpoint_every=100, persist_batches=False, **options)


def test_a_sigmoid_head_drifting_into_saturation(tmp_path):
    """AdamW at lr 0.02 pushes the sigmoid head's inputs out of its slope within 50 steps."""
    record(tmp_path, lr=0.02)
    first = next(a for a in alerts(tmp_path) if a["rule"] == "saturation")
    assert first["evidence"]["saturation"] >= 0.9 and first["step"] <= 60
    assert "within 1% of the bounded head's limits" in first["message"]
    assert first_of(tmp_path)["saturation"] < first_of(tmp_path).get("loss_at_chance", STEPS)
    assert offline(tmp_path) == first_of(tmp_path)


def test_a_loss_pinned_at_chance(tmp_path):
    """An unbounded head at tau 5 with lr 1e-5: the energies never part, the loss stays at
    log 8 (the remedy 'tau 2–5' overshot, with an lr a warm-up never left)."""
    record(
        tmp_path,
        lr=1e-5,
        model_kwargs={"head": "identity"},
        loss={"name": "inbatch_infonce", "kwargs": {"tau": 5.0}},
    )
    assert first_of(tmp_path) == {"loss_at_chance": 140}
    (alarm,) = alerts(tmp_path)
    assert alarm["evidence"]["since"] == 100
    assert abs(alarm["evidence"]["chance_loss"] - torch.log(torch.tensor(8.0)).item()) < 1e-6
    assert "loss_floor" not in rows(tmp_path)[0]  # an unbounded head has no floor
    assert offline(tmp_path) == {"loss_at_chance": 140}


def test_a_loss_at_the_floor_its_bounded_head_allows(tmp_path):
    """The sigmoid head at tau 100: logits differ by at most 0.01, the floor is 2.0707 against
    chance 2.0794, and the alarm names the floor rather than chance."""
    record(tmp_path, loss={"name": "inbatch_infonce", "kwargs": {"tau": 100.0}})
    fired = first_of(tmp_path)
    assert fired == {"loss_at_floor": 140}
    (alarm,) = alerts(tmp_path)
    assert alarm["evidence"]["loss_floor"] == pytest.approx(2.07066, abs=1e-4)
    assert "the span leaves almost no room" in alarm["message"]
    assert offline(tmp_path) == fired


@pytest.mark.parametrize("seed", range(5))
def test_healthy_energy_runs_stay_quiet_past_every_warmup(tmp_path, seed):
    record(tmp_path, seed=seed)
    assert alerts(tmp_path) == []
    assert offline(tmp_path) == {}
    watched = rows(tmp_path)[100]
    assert {"saturation", "logit_spread", "chance_loss", "loss_floor"} <= set(watched)


def test_watching_changes_nothing_the_run_computes(tmp_path):
    """The head search runs a forward of its own, in eval mode with the RNG forked: a run with
    dropout gives the same losses watched and unwatched."""
    kwargs = {"model_kwargs": {"dropout": 0.2}, "steps": 25, "persist_batches": False}
    handloop.train(tmp_path / "watched", **kwargs)
    handloop.train(tmp_path / "unwatched", monitors=[], **kwargs)
    losses = [[r["loss"] for r in rows(tmp_path / run)] for run in ("watched", "unwatched")]
    assert losses[0] == losses[1]
    assert "saturation" in rows(tmp_path / "watched")[0]
    assert "saturation" not in rows(tmp_path / "unwatched")[0]


def test_adam_ratio_flags_a_batch_unlike_any_before():
    """g²/v̂ is about 1 on steady gradients and ×1e4 on a gradient ×100 its history."""
    from energydiag.record.live import AdamRatio, Watched
    from energydiag.record.monitors import AdamRatioHigh

    weight = torch.nn.Parameter(torch.ones(8))
    optimizer = torch.optim.Adam([weight], lr=1e-3)
    ratio = AdamRatio(every=1)  # by default every 10th step
    assert ratio.attach(Watched(torch.nn.Linear(1, 1), optimizer, None))
    rule, seen = AdamRatioHigh(), []
    for step in range(30):
        weight.grad = torch.full((8,), 100.0 if step == 25 else 1.0)
        measured = ratio.measure(step)
        seen.append(float(measured["adam_ratio"]) if measured else None)
        alarm = rule.observe(step, {k: float(v) for k, v in measured.items()})
        optimizer.step()
        if step == 25:
            assert alarm is not None and alarm.rule == "adam_ratio"
        else:
            assert alarm is None
    assert seen[0] is None and seen[10] == pytest.approx(1.0, rel=1e-3)
    assert seen[25] == pytest.approx(1e4, rel=1e-3)
    assert not AdamRatio().attach(
        Watched(torch.nn.Linear(1, 1), torch.optim.SGD([weight], lr=0.1), None)
    )
