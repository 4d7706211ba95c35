"""Planted faults, each recorded through a hand-written loop: replay, bisect, diagnose and
inspect must name the step, phase, module, op and cause, and agree with each other."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from handloop import train

from energydiag.analyses.bisection import bisect, bisect_checkpoints
from energydiag.analyses.curves import analyse
from energydiag.analyses.diagnosis import diagnose
from energydiag.analyses.inspection import inspect
from energydiag.analyses.replaying import replay_report
from energydiag.analyses.timeline import timeline
from energydiag.analyses.variants import parse_variant
from energydiag.analyses.whatif import whatif
from energydiag.contrastive.bounds import infonce_curve_bounds
from energydiag.io.rundir import Run
from energydiag.io.torchfiles import discover


def explode_at(step_to_plant: int, factor: float = 1e25):
    """Between two steps, something outside the optimizer multiplies the weights: still finite."""

    def plant(step, model, batch):
        if step == step_to_plant:
            with torch.no_grad():
                model.ctx_in.weight.mul_(factor)

    return plant


@pytest.fixture(scope="module")
def exploded(tmp_path_factory):
    root = tmp_path_factory.mktemp("exploded") / "run"
    train(root, steps=20, plant=explode_at(12), skip_nonfinite=True)
    return root


def test_exploded_checkpoint_is_flagged_by_inspect(exploded):
    report = inspect(exploded / "checkpoints" / "step-00000015.safetensors")
    assert not any(t.nonfinite for t in report.checkpoint.tensors)
    codes = [f.code for f in report.findings]
    assert "checkpoint.exploded" in codes and "checkpoint.grown" in codes
    layers = report.checkpoint.stats.exploded()
    assert [r["layer"] for r in layers] == ["ctx_in"]
    assert all(math.isfinite(t.l2) for t in report.checkpoint.tensors)  # finite in, finite out
    clean = inspect(exploded / "checkpoints" / "step-00000010.safetensors")
    assert "checkpoint.exploded" not in [f.code for f in clean.findings]


def test_timeline_shows_when_the_weights_blew_up(exploded):
    result = timeline(Run(exploded).checkpoint_paths())
    by_step = {r.step: r for r in result.rows}
    # 12 is the Recorder's dump: the loss went non-finite on the first step after the edit
    assert not by_step[10].exploded and by_step[12].exploded and by_step[15].exploded
    assert by_step[12].worst_layer == "ctx_in"
    assert by_step[12].growth_since_first > 1e20
    assert result.findings[0].code == "timeline.exploded"
    assert result.findings[0].evidence["first_step"] == 12


def test_bisect_names_the_explosion_interval_from_checkpoints_alone(exploded):
    paths = discover(exploded, "checkpoints/step-{step}.safetensors")
    result = bisect_checkpoints(paths, predicate="exploded")
    assert (result.last_good_checkpoint, result.first_bad_checkpoint) == (10, 12)
    assert result.warnings == []  # the last checkpoint is still exploded: not a recovery
    bounded = bisect_checkpoints(paths, good=5, bad=20, predicate="exploded")
    assert (bounded.last_good_checkpoint, bounded.first_bad_checkpoint) == (10, 12)
    assert all(5 <= e.step <= 20 for e in bounded.evaluations)


def test_bisect_from_the_run_directory_says_the_replay_cannot_see_the_edit(exploded):
    result = bisect(Run(exploded), predicate="exploded")
    assert (result.last_good_checkpoint, result.first_bad_checkpoint) == (10, 12)
    # the replay from 10 cannot see the edit; the bad checkpoint's own step localises it
    assert result.first_bad_step == 12 and result.changed_outside_steps == (10, 12)
    assert "bisect.changed_outside_steps" in [f.code for f in result.findings]


def test_flat_at_chance_log_of_eleven_points():
    """A W&B export with one point every 10 steps, sitting at log 8 the whole time."""
    steps = np.arange(0, 110, 10)
    values = math.log(8) + np.array([0, 1e-4, -1e-4, 0, 2e-5, 0, -3e-5, 1e-4, 0, -1e-4, 0])
    values[6] -= 1e-3  # one small dip: not a spike on a flat line
    frame = pd.DataFrame({"step": steps, "loss": values})
    report = analyse(frame, "loss", bounds=infonce_curve_bounds(8, 0.5, 1.0))
    assert report.plateaus and report.plateau_on == "chance"
    assert report.spikes == []
    assert report.findings[0].code == "curve.plateau_at_chance"


def test_level_measurably_below_chance_is_not_at_chance():
    steps = np.arange(0, 300)
    values = 1.9 + np.random.default_rng(0).normal(0, 1e-3, steps.size)  # log 8 = 2.079
    report = analyse(
        pd.DataFrame({"step": steps, "loss": values}),
        "loss",
        bounds=infonce_curve_bounds(8, 0.5, 1.0),
    )
    assert report.plateaus and report.plateau_on is None


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A model that raises on non-finite energies; an all-masked row at step 7 trips it."""

    def mask_all(step, model, batch):
        if step == 7:
            batch["pad_mask"][2] = True

    root = tmp_path_factory.mktemp("guarded") / "run"
    with pytest.raises(RuntimeError, match="non-finite energies"):
        train(root, steps=12, model="faulty:NonFiniteGuardModel", plant=mask_all)
    return root


def test_loop_that_raises_dumps_the_ring(guarded):
    failure = json.loads((guarded / "failure.json").read_text())
    assert failure["step"] == 7 and failure["reason"] == "exception"
    assert "non-finite energies" in failure["exception"]
    assert failure["checkpoint"] == 7  # raised in forward: the pre-step state is intact
    assert Run(guarded).batch_steps[-1] == 7


def test_guard_message_and_the_op_it_caught(guarded):
    fault = replay_report(Run(guarded), 5).fault
    assert (fault.step, fault.phase) == (7, "forward")
    assert "non-finite energies" in fault.exception
    assert fault.op.op == "aten::_softmax" and fault.module == "attn"
    assert fault.all_masked_samples == [2]
    diagnosis = diagnose(Run(guarded))
    assert diagnosis.fault.step == 7 and diagnosis.verdict == "non-finite"


def test_whatif_reports_the_exception_of_each_variant(guarded):
    report = whatif(Run(guarded), 5, 3, [parse_variant("tau=1")])
    assert not report.baseline.finite and "non-finite energies" in report.baseline.exception
    (finding,) = [f for f in report.findings if f.code == "whatif.baseline_failed"]
    assert "raised RuntimeError" in finding.title
    assert report.baseline.relative_drop is None  # no percentage of a failed run


def test_fp16_autocast_overflow_is_blamed_at_the_cast(tmp_path):
    def big_weight(step, model, batch):
        if step == 6:
            with torch.no_grad():
                model.act_in.weight[0, 0] = 1e5  # beyond float16's 65504

    root = tmp_path / "run"
    train(root, steps=10, autocast=torch.float16, plant=big_weight, checkpoint_every=3)
    report = replay_report(Run(root), 6)  # checkpoint 6 holds the large weight
    fault = report.fault
    assert fault.step == 6 and fault.phase == "forward"
    assert fault.op.op == "aten::_to_copy" and fault.module == "act_in"
    assert fault.op.detail["to_dtype"] == "float16" and fault.op.detail["dtype_max"] == 65504
    assert "exceeds float16's largest finite 65504" in report.findings[0].title


def test_backward_nan_inside_a_submodule(tmp_path):
    root = tmp_path / "run"
    train(root, steps=4, model="faulty:BackwardNaNModel")
    report = replay_report(Run(root), 0)
    fault = report.fault
    assert (fault.step, fault.phase, fault.module) == (0, "backward", "fragile")
    assert fault.op.autograd_node == "SqrtBackward0"
    diagnosis = diagnose(Run(root))
    assert diagnosis.verdict == "non-finite" and diagnosis.fault.module == "fragile"


def test_gradient_norm_overflow_with_finite_elements(tmp_path):
    def huge_scale(step, model, batch):
        batch["scale"] = torch.tensor(1e25 if step == 8 else 1.0)

    root = tmp_path / "run"
    train(
        root,
        steps=12,
        loss={"target": "faulty:scaled_loss", "kwargs": {"tau": 0.5}},
        plant=huge_scale,
    )
    run = Run(root)
    assert run.first_failure() == 8
    report = replay_report(run, 5)
    fault = report.fault
    assert (fault.step, fault.phase, fault.reproduced) == (8, "clip", True)
    assert fault.op.op in ("aten::_foreach_norm", "aten::linalg_vector_norm")
    assert "overflow float32" in report.findings[0].title
    assert diagnose(run).fault.phase == "clip"
    assert bisect(run).first_bad_step == 8


def test_lr_spike_between_checkpoints_is_named(tmp_path):
    def spike(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1e34 if s == 13 else 1.0)

    root = tmp_path / "run"
    train(root, steps=18, scheduler=spike)
    run = Run(root)
    report = replay_report(run, 10)
    assert report.fault.step == 13 and report.fault.phase == "optimizer"
    (jump,) = [f for f in report.findings if f.code == "schedule.jump"]
    assert "lr jumped ×1e+34 at step 13" in jump.title
    assert diagnose(run).fault.step == 13 == bisect(run).first_bad_step


def test_std_over_one_element_in_words(tmp_path):
    root = tmp_path / "run"
    train(root, steps=3, loss={"target": "faulty:std_of_one_loss", "kwargs": {"tau": 0.5}})
    report = replay_report(Run(root), 0)
    assert report.fault.op.op.startswith("aten::std")
    assert "zero degrees of freedom" in report.findings[0].title


def test_where_gradient_trap_in_words(tmp_path):
    root = tmp_path / "run"
    train(root, steps=3, loss={"target": "faulty:where_trap_loss", "kwargs": {"tau": 0.5}})
    report = replay_report(Run(root), 0)
    fault = report.fault
    assert fault.phase == "backward" and fault.masked_by_where
    assert fault.op.op == "aten::log"
    assert "torch.where gradient trap" in report.findings[0].title


def test_backwards_margin_is_flagged(tmp_path):
    root = tmp_path / "run"
    loss = {"target": "faulty:backwards_margin", "kwargs": {"margin": 0.5}}
    train(root, steps=30, lr=1e-2, loss=loss, checkpoint_every=10)
    first = inspect(root / "checkpoints" / "step-00000000.safetensors")
    assert "contrastive.wrong_sign" not in [f.code for f in first.findings]  # init noise
    report = inspect(root / "checkpoints" / "step-00000020.safetensors")
    (flag,) = [f for f in report.findings if f.code == "contrastive.wrong_sign"]
    assert flag.severity == "error" and "relu(margin + E_pos - E_neg)" in flag.remedy


def test_a_sigmoid_head_under_another_name_has_bounds(tmp_path):
    root = tmp_path / "run"
    train(root, steps=3, model="faulty:RenamedHeadModel", checkpoint_every=1)
    report = inspect(root / "checkpoints" / "step-00000002.safetensors").batch
    assert report.head["bounds"] == pytest.approx([0.1, 2.1])
    assert report.head["module"] == "energy_gate"
    assert report.bounds["head"]["floor"] == pytest.approx(math.log1p(7 * math.exp(-2.0 / 0.5)))


def test_timeline_command_table_json_and_png(exploded, tmp_path):
    from typer.testing import CliRunner

    from energydiag.cli import app

    runner = CliRunner()
    png = tmp_path / "timeline.png"
    shown = runner.invoke(app, ["timeline", str(exploded), "--png", str(png)], terminal_width=160)
    assert shown.exit_code == 1  # the weights exploded
    assert "Checkpoints over time" in shown.stdout and "ctx_in" in shown.stdout
    assert "weights grew" in shown.stdout
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(runner.invoke(app, ["timeline", str(exploded), "--json"]).stdout)
    assert [r["step"] for r in data["rows"] if r["exploded"]][0] == 12


def test_log_of_an_energy_that_reached_zero(tmp_path):
    """relu head without eps: a negative raw score gives an energy of exactly 0."""
    root = tmp_path / "run"
    head = {"head": "relu_scaled", "head_kwargs": {"scale": 1.0, "eps": 0.0}}
    train(
        root,
        steps=3,
        model_kwargs=head,
        loss={"target": "faulty:log_energy_loss", "kwargs": {"tau": 0.5}},
    )
    report = replay_report(Run(root), 0)
    fault = report.fault
    assert fault.phase == "forward" and fault.op.op == "aten::log"
    assert fault.op.detail["zero_inputs"] > 0
    assert "aten::log of 0" in report.findings[0].title


def test_adam_with_zero_eps_blows_up_in_the_optimizer(tmp_path):
    """A parameter that never receives gradient: Adam divides 0 by sqrt(0) + eps = 0."""

    def zero_eps(optimizer):
        for group in optimizer.param_groups:
            group["eps"] = 0.0

    def dead_feature(step, model, batch):
        batch["h"][..., 0] = (
            0.0  # a context feature that is always zero: its weights get no gradient
        )

    root = tmp_path / "run"
    train(root, steps=3, scheduler=zero_eps, plant=dead_feature)
    report = replay_report(Run(root), 0)
    fault = report.fault
    assert fault.phase == "optimizer" and fault.reproduced and fault.micro_batch is None
    assert fault.op.op in ("aten::addcdiv_", "aten::_foreach_addcdiv_")
    assert any(state["eps"] == 0.0 for state in fault.optimizer_state.values())
    title = report.findings[0].title
    assert "updating 'ctx_in.weight'" in title and "Adam divides by sqrt(exp_avg_sq) + eps" in title


def _mask_at(step_to_plant):
    def plant(step, model, batch):
        if step == step_to_plant:
            batch["pad_mask"][2] = True

    return plant


def _weight_at(step_to_plant, value):
    def plant(step, model, batch):
        if step == step_to_plant:
            with torch.no_grad():
                model.act_in.weight[0, 0] = value

    return plant


AGREEMENT = {
    "masked row": dict(steps=9, plant=_mask_at(6)),
    "fp16 cast": dict(
        steps=8, autocast=torch.float16, plant=_weight_at(6, 1e5), checkpoint_every=3
    ),
    "backward NaN": dict(steps=3, model="faulty:BackwardNaNModel"),
    "std of one": dict(steps=3, loss={"target": "faulty:std_of_one_loss", "kwargs": {"tau": 0.5}}),
    "where trap": dict(steps=3, loss={"target": "faulty:where_trap_loss", "kwargs": {"tau": 0.5}}),
}


@pytest.mark.parametrize("case", sorted(AGREEMENT))
def test_diagnose_replay_and_bisect_agree(tmp_path, case):
    root = tmp_path / "run"
    train(root, **AGREEMENT[case])
    run = Run(root)
    replayed = replay_report(run, run.first_failure()).fault.step  # `replay --from-step S`
    assert diagnose(run).fault.step == replayed == bisect(run).first_bad_step, case
