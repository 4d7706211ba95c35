"""The contrastive doctor on planted batches of hand-written runs: each failure mode named with
its numbers, and a healthy model named for nothing."""

from __future__ import annotations

import math

import pytest
import torch
from handloop import train
from safetensors.torch import load_file, save_file

from energydiag.analyses.inspection import inspect
from energydiag.contrastive.doctor import context_rank, duplicate_counts, duplicate_floor
from energydiag.io.manifest import LossSpec
from energydiag.io.tensorfile import read_metadata
from energydiag.reference.synthetic import Task

DOCTOR = {
    "contrastive.duplicate_actions",
    "contrastive.dominant_negative",
    "contrastive.hard_negatives",
    "precision.fp16_logits",
    "contrastive.context_collapse",
    "contrastive.margin_collapse",
    "precision.float_absorption",
}


def codes(report) -> set[str]:
    return {f.code for f in report.findings}


def by_code(report, code):
    return next(f for f in report.findings if f.code == code)


def duplicate_rows(step, net, batch):
    batch["a_pos"][2:4] = batch["a_pos"][0:2]  # 4 of 10 rows share their action


def alike_contexts(step, net, batch):
    noise = 1e-3 * torch.randn(batch["h"].shape, generator=torch.Generator().manual_seed(step))
    batch["h"].copy_(batch["h"][:1, :1].expand_as(batch["h"]) + noise)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    recipes = {
        "duplicates": dict(task=Task(batch=10), plant=duplicate_rows, model_kwargs={"head": "softplus"}),
        "fp16": dict(autocast=torch.float16, loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.02}}),
        "collapse": dict(plant=alike_contexts, model_kwargs={"head": "softplus"}),
        "healthy": dict(model_kwargs={"head": "softplus"}),
    }  # fmt: skip
    for name, recipe in recipes.items():
        train(root / name, steps=6, checkpoint_every=5, **recipe)
    return root


def checkpoint(run, step=5):
    return run / "checkpoints" / f"step-{step:08d}.safetensors"


def test_duplicate_actions_raise_the_floor_and_are_named(runs):
    report = inspect(checkpoint(runs / "duplicates"))
    found = by_code(report, "contrastive.duplicate_actions")
    assert "40% of rows share their action" in found.title
    doctor = report.batch.doctor
    assert doctor["duplicate_action_rows"] == pytest.approx(0.4)
    assert doctor["duplicate_floor"] > report.batch.bounds["observed"]["floor"]


def test_a_tiny_tau_under_fp16_names_the_overflow_before_it_happens(runs):
    report = inspect(checkpoint(runs / "fp16"))
    found = by_code(report, "precision.fp16_logits")
    # the sigmoid head allows a span of 1: 1 / 0.02 = 50, named while the loss is still finite
    assert found.evidence["logit_span_allowed"] == pytest.approx(50, rel=1e-3)
    assert found.evidence["logit_span_allowed"] > math.log(65504) and math.isfinite(
        report.batch.loss
    )


def test_contexts_alike_up_to_noise_are_a_collapse(runs):
    report = inspect(checkpoint(runs / "collapse"))
    found = by_code(report, "contrastive.context_collapse")
    assert found.evidence["mean_cosine"] > 0.98 and found.evidence["rankme"] < 1.5


def test_a_summed_or_averaged_hinge_at_its_margin_with_equal_energies_is_total_collapse(
    fixtures_dir, tmp_path
):
    source = fixtures_dir / "stalled" / "batches" / "step-00000040.safetensors"
    tensors, meta = load_file(str(source)), read_metadata(source)
    tensors["a_neg"] = tensors["a_pos"].flip(0).unsqueeze(1).contiguous()
    batch = tmp_path / "batch-00000040.safetensors"
    save_file(tensors, str(batch), metadata=meta)
    report = inspect(
        fixtures_dir / "stalled" / "checkpoints" / "step-00000040.safetensors",
        fixtures_dir / "stalled",
        batch,
        loss_spec=LossSpec(name="margin", kwargs={"margin": 0.5}),
    )
    found = by_code(report, "contrastive.margin_collapse")
    assert "exactly m = 0.5" in found.title


def test_a_healthy_model_gets_none_of_the_doctor_findings(runs, fixtures_dir):
    assert not codes(inspect(checkpoint(runs / "healthy"))) & DOCTOR
    healthy = fixtures_dir / "healthy" / "checkpoints" / "step-00000100.safetensors"
    assert not codes(inspect(healthy)) & DOCTOR


def test_the_quantities_themselves():
    a = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(0))
    a[3] = a[0]
    counts = duplicate_counts(a)
    assert counts.tolist() == [2, 1, 1, 2, 1, 1]
    # k copies: ln(k + (B - k) e^{-span/tau}); an unbounded span leaves mean ln k
    assert duplicate_floor(counts, math.inf, 0.5) == pytest.approx(2 * math.log(2) / 6)
    alike = context_rank(torch.ones(8, 16) + 1e-6 * torch.randn(8, 16))
    spread = context_rank(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)))
    assert alike["mean_cosine"] > 0.999 and alike["rankme"] < 1.01
    assert abs(spread["mean_cosine"]) < 0.3 and spread["rank_ratio"] > 0.7


def test_float_absorption_breaks_the_softmax_zero_sum():
    from energydiag import findings as rules
    from energydiag.contrastive.doctor import zero_sum_violation

    gap = torch.ones(8, 8)
    gap.fill_diagonal_(0.0)  # every positive 1 below its negatives; at tau 0.05, a gap of 20
    absorbed = zero_sum_violation(gap, 0.05)
    assert absorbed["absorbed_rows"] == 8 and absorbed["zero_sum_violation"] == pytest.approx(1.0)
    assert rules.float_absorption(absorbed).code == "precision.float_absorption"
    exact = zero_sum_violation(gap.double(), 0.05)  # float64 keeps e^-20 next to 1
    assert exact["absorbed_rows"] == 0 and rules.float_absorption(exact) is None


def test_a_row_offset_drifting_into_the_sigmoid_bound_is_named_with_its_trend(tmp_path):
    from energydiag.analyses.diagnosis import diagnose
    from energydiag.io.rundir import Run

    def drift(step, net, batch):  # a user-side drift of the head's pre-activation
        with torch.no_grad():
            net.pred[-1].bias += 0.15

    train(tmp_path / "run", steps=60, checkpoint_every=12, model_kwargs={"head": "sigmoid"},
          plant=drift)  # fmt: skip
    result = diagnose(Run(tmp_path / "run"))
    found = next(f for f in result.findings if f.code == "energy.offset_drift")
    points = found.evidence["points"]
    assert len(points) >= 5 and points[-1]["energy_mean"] > points[0]["energy_mean"] + 0.3
    assert "toward the head's bound 1" in found.title and found.severity == "error"


def test_a_healthy_run_has_no_offset_drift(fixtures_dir):
    from energydiag.analyses.diagnosis import diagnose
    from energydiag.io.rundir import Run

    assert "energy.offset_drift" not in [
        f.code for f in diagnose(Run(fixtures_dir / "healthy")).findings
    ]
