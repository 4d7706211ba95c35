"""Rules over the contrastive doctor's quantities (energydiag.contrastive.doctor.measure).

Each rule's precondition is its own evidence; thresholds are named constants the README lists.
"""

from __future__ import annotations

import math
from typing import Any

from energydiag.findings.base import Finding

DUPLICATE_SHARE = 0.1  # this share of rows sharing their action with another row is a finding
NEAR_FLOOR = 0.1  # within this fraction of (chance − raised floor) above the raised floor
DOMINANT_NEGATIVE = 0.9  # the hardest negative's share of a row's negative weight
HARD_NEGATIVES = 0.5  # more than this share of negatives below their positive
COLLAPSED_COSINE = 0.98  # contexts whose mean pairwise cosine is above this look alike
FP16_EXP_LIMIT = math.log(65504.0)


def duplicate_actions(
    m: dict[str, float], loss: float, plain_floor: float | None, chance: float | None
) -> Finding | None:
    share = m.get("duplicate_action_rows", 0.0)
    raised = m.get("duplicate_floor")
    if share < DUPLICATE_SHARE or raised is None:
        return None
    stuck = chance is not None and loss <= raised + NEAR_FLOOR * max(chance - raised, 0.0)
    above = f" above the plain floor {plain_floor:.4g}" if plain_floor is not None else ""
    return Finding(
        "contrastive.duplicate_actions",
        "error" if stuck else "warning",
        f"{share:.0%} of rows share their action with another row (mean copies "
        f"{m['duplicate_action_k_mean']:.2g}): those false negatives raise the loss's floor to "
        f"{raised:.4g}{above}"
        + (f", and the loss {loss:.4g} sits on it" if stuck else ""),
        "drop or merge repeated actions within a batch (no-op or held-gripper chunks), or leave "
        "equal actions out of each row's negatives",
        {**_keep(m, "duplicate_action_rows", "duplicate_action_k_mean", "duplicate_floor"),
         "loss": loss, "plain_floor": plain_floor, "chance": chance,
         "link": {"stage": 0, "what": f"{share:.0%} of rows have duplicate actions (floor {raised:.3g})"}},
    )  # fmt: skip


def dominant_negative(m: dict[str, float]) -> Finding | None:
    share = m.get("hardest_negative_share")
    if share is None or share < DOMINANT_NEGATIVE:
        return None
    return Finding(
        "contrastive.dominant_negative",
        "warning",
        f"one negative takes {share:.0%} of each row's negative weight on average (effective "
        f"negatives {m['effective_negatives_ratio']:.2g} of B − 1): the gradient comes from one "
        "action per row",
        "look for a false negative (the same action, or the same episode) or a tau so small the "
        "softmax is one-hot",
        _keep(m, "hardest_negative_share", "effective_negatives_ratio"),
    )


def hard_negatives(m: dict[str, float]) -> Finding | None:
    share = m.get("hard_negative_fraction")
    if share is None or share <= HARD_NEGATIVES:
        return None
    return Finding(
        "contrastive.hard_negatives",
        "warning",
        f"{share:.0%} of negatives score lower energy than their row's positive (E_ij < E_ii)",
        "more than half is worse than chance: a wrong sign in the loss, or negatives that are "
        "really positives (duplicates)",
        _keep(m, "hard_negative_fraction"),
    )


def fp16_temperature(m: dict[str, float], autocast_dtype: str | None) -> Finding | None:
    span, allowed = m.get("logit_span"), m.get("logit_span_allowed")
    worst = max((s for s in (span, allowed) if s is not None), default=None)
    if autocast_dtype != "float16" or worst is None or worst <= FP16_EXP_LIMIT:
        return None
    now = f"the logits span {span:.3g} now" if span is not None else "the logit span"
    head = f" and the bounded head allows {allowed:.3g}" if allowed is not None else ""
    return Finding(
        "precision.fp16_logits",
        "warning",
        f"under float16 autocast {now}{head} (energy span / tau): a naive exp(logits) "
        f"overflows past {FP16_EXP_LIMIT:.2f}"
        + ("" if span is not None and span > FP16_EXP_LIMIT else ", before training gets there"),
        "compute the contrastive loss with cross_entropy/logsumexp (they subtract the max and "
        "run in float32 under autocast), or keep it outside autocast; a larger tau narrows it",
        {"logit_span": span, "logit_span_allowed": allowed, "limit": FP16_EXP_LIMIT,
         "autocast_dtype": autocast_dtype},
    )  # fmt: skip


def context_collapse(m: dict[str, float], offset_explains: bool) -> Finding | None:
    """Contexts that all look alike: swap InfoNCE is at chance whatever the head does. A constant
    input offset also makes them look alike; its own finding says so, this one then does not."""
    cosine = m.get("mean_cosine")
    if cosine is None or cosine < COLLAPSED_COSINE or offset_explains:
        return None
    return Finding(
        "contrastive.context_collapse",
        "error",
        f"the batch's contexts look alike: mean pairwise cosine {cosine:.4f}, RankMe "
        f"{m['rankme']:.3g} of a possible {m['rankme'] / m['rank_ratio']:.0f}",
        "the context features carry no per-sample information: check what feeds h (a frozen or "
        "collapsed backbone, a constant token, a pooling over padding)",
        {**_keep(m, "mean_cosine", "max_cosine", "rankme", "rank_ratio"),
         "link": {"stage": 0, "what": f"contexts collapsed (mean cosine {cosine:.3f})"}},
    )  # fmt: skip


def float_absorption(m: dict[str, float]) -> Finding | None:
    """A softmax row whose logit gradients do not sum to 0: its positive's share rounded to 1,
    so the positive stops being pulled while the negatives are still pushed."""
    rows = m.get("absorbed_rows", 0.0)
    if not rows:
        return None
    return Finding(
        "precision.float_absorption",
        "warning",
        f"in {rows:.0f} row(s) the softmax's logit gradients do not sum to 0 (up to "
        f"{m['zero_sum_violation']:.2g} of their magnitude): the positive's probability rounds to "
        "1 and its gradient to 0 while the negatives keep theirs",
        "the logits are too far apart for the dtype: a larger tau, or the loss in float32; "
        "left alone the features inflate to widen the gap further",
        _keep(m, "zero_sum_violation", "absorbed_rows"),
    )


def margin_collapse(
    loss: float, margin: float | None, batch_size: int, energy_std: float
) -> Finding | None:
    """A hinge sitting exactly at B·m (summed) or m (averaged) with every energy equal (their
    spread under 1e-4 of the margin, float rounding aside): no pair is separated at all."""
    if margin is None or margin <= 0 or not math.isfinite(loss) or energy_std > 1e-4 * margin:
        return None
    for total, how in ((batch_size * margin, f"B·m = {batch_size}·{margin:g}"), (margin, "m")):
        if math.isclose(loss, total, rel_tol=1e-4):
            return Finding(
                "contrastive.margin_collapse",
                "error",
                f"the hinge loss is exactly {how} = {total:g} and every energy is equal: total "
                "collapse, no pair is separated",
                "the energies do not depend on the action: a saturated or constant head, or an "
                "action path cut from the graph",
                {"loss": loss, "margin": margin, "batch_size": batch_size},
            )
    return None


def _keep(m: dict[str, float], *keys: str) -> dict[str, Any]:
    return {k: m[k] for k in keys if k in m}


def doctor_findings(
    m: dict[str, float],
    loss: float,
    reach: dict[str, float] | None,
    autocast_dtype: str | None,
    margin: float | None,
    energy_std: float,
    offset_explains: bool,
) -> list[Finding | None]:
    """Every doctor rule over one batch's measurements (``reach``: the floor and chance)."""
    floor, chance = (reach["floor"], reach["chance"]) if reach else (None, None)
    return [
        duplicate_actions(m, loss, floor, chance),
        dominant_negative(m),
        hard_negatives(m),
        fp16_temperature(m, autocast_dtype),
        context_collapse(m, offset_explains),
        float_absorption(m),
        margin_collapse(loss, margin, int(m.get("batch_size", 0)), energy_std),
    ]


OFFSET_DRIFT = 5.0  # the common offset moves by this many within-row spreads
NEAR_BOUND = 0.2  # and ends within this fraction of the head's span from one of its bounds


def offset_drift(trend: dict[str, Any]) -> Finding | None:
    """The energies' mean drifting over checkpoints (into a bounded head's limit) while their
    in-batch spread, all the loss sees, stays small."""
    points, bounds = trend["points"], trend["bounds"]
    if len(points) < 3:
        return None
    first, last = points[0], points[-1]
    moved = last["energy_mean"] - first["energy_mean"]
    spread = max(max(p["within_row_std"] for p in points), 1e-12)
    if abs(moved) < OFFSET_DRIFT * spread:
        return None
    where = ""
    if bounds is not None:
        lo, hi = bounds
        edge = hi if moved > 0 else lo
        if abs(edge - last["energy_mean"]) > NEAR_BOUND * (hi - lo):
            return None  # drifting, but not into the head's limit: nothing the loss pays for
        where = f" toward the head's bound {edge:.3g}"
    return Finding(
        "energy.offset_drift",
        "warning" if bounds is None else "error",
        f"the energies' mean drifts {first['energy_mean']:.3g} → {last['energy_mean']:.3g} over "
        f"checkpoints {first['step']}–{last['step']}{where}, while their spread within a row is at "
        f"most {spread:.3g}: a row offset swap InfoNCE cannot see",
        "anchor the energy scale: an unbounded or softplus head, a small penalty on the mean "
        "energy (E_pos² or (mean E)²), or normalise the head's input",
        {"points": points, "bounds": bounds,
         "link": {"stage": 2, "step": first["step"], "what": f"energy offset {first['energy_mean']:.3g} → {last['energy_mean']:.3g}{where}"}},
    )  # fmt: skip
