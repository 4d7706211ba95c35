"""The pure rules of findings/: evidence in, a finding (or nothing) out, each precondition
tested on both sides."""

from __future__ import annotations

import math

import pytest

from energydiag import findings as rules
from energydiag.report.console import command_line


def schedule(lr: dict[int, float], reference=5e-4, source="initial_lr", wd=0.1, decoupled=True):
    return {
        "lr": lr,
        "reference": reference,
        "reference_source": source,
        "weight_decay": wd,
        "decoupled": decoupled,
        "jumps": [],
    }


def test_an_lr_far_past_its_reference_is_named_with_its_numbers():
    ramp = {s: 5e-4 * min(5e4, 500.0 * (s + 1)) for s in range(0, 200, 10)}
    found = rules.lr_beyond_reference(schedule(ramp))
    assert found.code == "schedule.lr_beyond_configured" and found.severity == "error"
    assert "0.25 → 25" in found.title and "×5e+04 its initial_lr 0.0005" in found.title
    assert found.evidence["verify"] == "lr=0.0005"
    assert found.evidence["link"]["stage"] == 1
    assert rules.lr_beyond_reference(schedule({0: 5e-4, 10: 4e-3})) is None  # ×8: a schedule
    assert rules.lr_beyond_reference(schedule(ramp, reference=None, source="none")) is None


def test_adamw_decay_factor_past_one_and_past_two():
    flips = rules.decoupled_decay_unstable(schedule({0: 1.0, 10: 15.0}))
    assert flips.code == "schedule.decay_factor" and "1 − lr·wd = -0.5 at step 10" in flips.title
    assert "flip sign every step" in flips.title
    grows = rules.decoupled_decay_unstable(schedule({0: 1.0, 10: 25.0}))
    assert "grow geometrically" in grows.title
    assert rules.decoupled_decay_unstable(schedule({0: 25.0}, decoupled=False)) is None  # SGD
    assert rules.decoupled_decay_unstable(schedule({0: 5.0})) is None  # lr·wd = 0.5
    assert rules.decoupled_decay_unstable(schedule({0: math.inf})) is None  # a jump's finding


def test_the_chain_orders_causes_before_effects_and_needs_two_links():
    links = [
        {"stage": 5, "step": 111, "what": "NaN at step 111"},
        {"stage": 2, "step": 100, "what": "weights grew"},
        {"stage": 1, "step": 0, "what": "lr ramps"},
    ]
    chain = rules.cause_chain(links, "cap the lr")
    assert chain.title == "lr ramps → weights grew → NaN at step 111"
    assert rules.cause_chain(links[:1], "cap the lr") is None


def outcome(base_finite, tried_finite, base_end=2.08, tried_end=1.9, sat=(1.0, 0.0)):
    def side(finite, end, saturation):
        return {
            "finite": finite,
            "failed_at": None if finite else 111,
            "loss_start": 2.08,
            "loss_end": end,
            "exception": None,
            "saturation": saturation,
            "input_grad_norm": 1e-5 if saturation > 0.5 else 1e-2,
        }

    return {
        "variant": "lr=0.0005",
        "from_step": 80,
        "to_step": 111,
        "baseline": side(base_finite, base_end, sat[0]),
        "variant_result": side(tried_finite, tried_end, sat[1]),
    }


def test_a_remedy_is_verified_only_by_what_the_replay_showed():
    fixed = rules.remedy_verified(outcome(False, True))
    assert fixed.code == "remedy.verified" and "stays finite" in fixed.title
    still = rules.remedy_verified(outcome(False, False))
    assert still.code == "remedy.not_verified" and "non-finite at step 111" in still.title
    stall = rules.remedy_verified(outcome(True, True, tried_end=2.07, sat=(1.0, 0.0)))
    assert "un-saturates the head (100% → 0%" in stall.title
    nothing = rules.remedy_verified(outcome(True, True, tried_end=2.078, sat=(0.2, 0.1)))
    assert nothing.code == "remedy.not_verified"


def test_an_input_offset_is_found_only_when_it_dominates():
    offset = {
        "h": {"offset": 40.0, "spread": 1.0, "rms": 40.0},
        "a_pos": {"offset": 0.1, "spread": 0.6, "rms": 0.6},
    }
    found = rules.input_offset(offset)
    assert found.code == "data.input_offset" and found.evidence["verify"] == "center=h"
    plain = {"h": {"offset": 0.05, "spread": 1.0, "rms": 1.0}, "a_pos": offset["a_pos"]}
    assert rules.input_offset(plain) is None


def test_few_negatives_needs_a_small_batch_and_a_loss_near_chance():
    found = rules.few_negatives(3, 0.95)
    assert found.severity == "error" and "only 2 negative(s) (B = 3)" in found.title
    assert rules.few_negatives(8, 0.95) is None
    assert rules.few_negatives(3, 0.2) is None  # it learns


def test_a_wider_range_is_a_remedy_for_bounded_heads_only():
    energy = {"energy_min": 0.5, "energy_max": 0.52}
    bounded = rules.narrow_energy_range(energy, 0.5, bounded=True)
    unbounded = rules.narrow_energy_range(energy, 0.5, bounded=False)
    assert "widen the energy range" in bounded.remedy
    assert "widen" not in unbounded.remedy and "unbounded" in unbounded.remedy
    assert rules.narrow_energy_range({"energy_min": math.nan, "energy_max": math.nan}, 0.5) is None


@pytest.mark.parametrize(("autocast", "says_autocast"), [(None, False), ("float16", True)])
def test_a_precision_fault_remedy_follows_the_precision_used(autocast, says_autocast):
    ladder = {
        "step": 7,
        "verdict": "precision",
        "autocast_dtype": autocast,
        "rungs": [
            {"precision": "as recorded", "status": "fails"},
            {"precision": "float32", "status": "fails" if autocast is None else "finite"},
            {"precision": "float64", "status": "finite"},
        ],
    }
    remedy = rules.precision_verdict(ladder).remedy
    assert ("keep the failing module in float32 under" in remedy) == says_autocast


def test_no_maths_verdict_without_float64():
    ladder = {
        "step": 7,
        "verdict": "undecided",
        "rungs": [{"precision": "float64", "status": "not applicable"}],
    }
    found = rules.precision_verdict(ladder)
    assert found.code == "precision.undecided" and "in the maths" not in found.title


def test_builtin_infonce_at_chance_is_not_told_to_check_its_sign():
    energy = {"retrieval_accuracy": 0.125, "pos_neg_gap": 0.001, "pos_neg_gap_row_std": 0.01}
    builtin = rules.contrastive_health(energy, 8, 8, "inbatch_infonce", None)
    plugin = rules.contrastive_health(energy, 8, 8, "mypkg.losses:custom", None)
    assert "sign convention" not in builtin.remedy and "sign convention" in plugin.remedy


def test_nonfinite_checkpoints_and_forward():
    rows = [{"step": 120, "nonfinite": 14259}, {"step": 140, "nonfinite": 14259}]
    found = rules.timeline_nonfinite(rows)
    assert found.code == "timeline.nonfinite" and "checkpoint 120" in found.title
    assert rules.timeline_nonfinite([]) is None
    forward = rules.forward_nonfinite(57, math.nan, 8, 64)
    assert "8 of 64 energies" in forward.title and "replay from this step" in forward.remedy
    assert command_line(forward.commands[0]) == "energydiag replay RUN --from-step 57"


def test_an_op_explained_twice_is_refused():
    import torch

    from energydiag.engine.explanations import explains

    with pytest.raises(ValueError, match="already explained"):

        @explains(torch.ops.aten.log)
        def again(call):
            return {}


def test_a_summed_hinge_at_b_times_m_is_total_collapse():
    summed = rules.margin_collapse(4.0, 0.5, 8, 0.0)
    assert summed.code == "contrastive.margin_collapse" and "B·m = 8·0.5" in summed.title
    assert rules.margin_collapse(4.0, 0.5, 8, 0.01) is None  # energies that differ: no collapse
    assert rules.margin_collapse(3.1, 0.5, 8, 0.0) is None  # a hinge still at work


def test_every_cause_an_op_can_name_has_one_account():
    """The engine's explanations name causes in their evidence; the findings hold one account
    of each: neither list has a cause the other lacks, and a second account is refused."""
    from energydiag.engine.explanations import CAUSES as NAMED
    from energydiag.findings.faults import CAUSES as ACCOUNTED
    from energydiag.findings.faults import accounts

    assert set(ACCOUNTED) == NAMED and len(NAMED) == 8
    with pytest.raises(ValueError, match="already has an account"):
        accounts("sqrt")(lambda name, d, fault: ("", ""))


def test_the_rank_that_went_first_is_named_only_when_one_did():
    from energydiag.analyses.rank_logs import RankLog, rank_finding

    local = [RankLog(0, 6, 5), RankLog(1, 5, 5), RankLog(2, None, 5)]
    found = rank_finding(local)
    assert found.code == "ranks.first_nonfinite" and found.evidence["ranks"] == [1]
    assert [r["rank"] for r in found.evidence["received"]] == [0, 2]
    assert rank_finding([RankLog(0, 5, 5), RankLog(1, 5, 5)]) is None  # every rank at once
    assert rank_finding([RankLog(0, None, None), RankLog(1, None, None)]) is None
