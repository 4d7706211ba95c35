"""Rules about the energy model on a batch: energy range, temperature, loss bounds, saturation,
retrieval and the sign of the positive-negative gap.
"""

from __future__ import annotations

import math
from typing import Any

from energydiag.findings.base import Finding, Invocation


def narrow_energy_range(
    stats: dict[str, float], tau: float | None, bounded: bool = False
) -> Finding | None:
    """``bounded``: the head's output range is limited (a sigmoid, a tanh): only then is
    widening it a remedy; an unbounded head's narrow energies are its own, not its range's."""
    span = stats["energy_max"] - stats["energy_min"]
    if tau is None or not math.isfinite(span) or span / tau >= 1.0:
        return None
    return Finding(
        "energy.narrow_range",
        "error" if span / tau < 0.1 else "warning",
        f"energies span only {span:.3g} at tau {tau:g}: logits differ by at most {span / tau:.3g}",
        _spread_remedy(bounded),
        {"energy_span": span, "tau": tau, "logit_spread": span / tau, "bounded_head": bounded},
    )


def _spread_remedy(bounded: bool) -> str:
    if bounded:
        return (
            "widen the energy range (softplus or unbounded head, or a wider scaled sigmoid) or "
            "lower tau; raising tau, often proposed, divides the spread further"
        )
    return (
        "the head is unbounded, so its range is not the limit: lower tau to spread the logits "
        "(they are -E/tau), and give the energies more to learn from (more negatives per positive)"
    )


def loss_position(loss: float, bounds: dict[str, float], batch_size: int) -> Finding | None:
    """Where a loss sits between the floor the head allows and chance (log B)."""
    floor, chance = bounds["floor"], bounds["chance"]
    if not math.isfinite(loss) or chance - floor <= 0:
        return None
    position = (loss - floor) / (chance - floor)
    evidence = {
        "loss": loss,
        "floor": floor,
        "chance": chance,
        "position": position,
        "batch_size": batch_size,
    }
    if abs(loss - chance) < 0.02 * chance:
        return Finding(
            "loss.at_chance",
            "error",
            f"loss {loss:.4f} sits at chance log({batch_size}) = {chance:.4f}: the model does not "
            "tell its positive from the in-batch negatives",
            "look for a saturated or constant energy head (no gradient reaches the body), a dead "
            "graph, or contexts that carry no information about the action",
            evidence,
        )
    if position < 0.1:
        return Finding(
            "loss.at_floor",
            "warning",
            f"loss {loss:.4f} is within 10% of the floor {floor:.4f} that the energy bound and tau "
            "allow: it cannot go lower however well the model ranks",
            "the plateau is the bound, not a training failure: widen the energy range or lower tau",
            evidence,
        )
    return None


def bounded_head_floor(
    bounds: tuple[float, float] | None,
    tau: float | None,
    batch_size: int,
    b: dict[str, float] | None,
) -> Finding | None:
    """``b``: the InfoNCE bounds the head's span allows, computed by the caller."""
    if bounds is None or tau is None or b is None or math.isinf(bounds[1] - bounds[0]):
        return None
    span = bounds[1] - bounds[0]
    return Finding(
        "head.bounded_floor",
        "warning" if b["floor"] > 0.1 * b["chance"] else "info",
        f"the energy head is bounded to a span of {span:.3g}: at tau {tau:g} and B {batch_size} the "
        f"InfoNCE loss cannot fall below {b['floor']:.4f} (chance is {b['chance']:.4f})",
        "use a softplus/unbounded head or a wider scaled sigmoid; raising tau raises this floor",
        {"head_span": span, "tau": tau, "batch_size": batch_size, **b},
    )


def saturation(fractions: list[dict[str, Any]], threshold: float = 0.5) -> Finding | None:
    worst = max(fractions, key=lambda s: s["fraction"], default=None)
    if worst is None or worst["fraction"] < threshold:
        return None
    return Finding(
        "activation.saturated",
        "error" if worst["fraction"] > 0.9 else "warning",
        f"{worst['fraction']:.0%} of {worst['op']} outputs in '{worst['module']}' are within 1e-3 "
        "of their limits: the local gradient there has all but vanished",
        "remove the squashing output (softplus/identity head) or re-centre its input (bias, "
        "normalisation)",
        {
            "saturation": fractions,
            "link": {
                "stage": 3,
                "what": f"{worst['op']} {worst['fraction']:.0%} saturated in '{worst['module']}'",
            },
            # replayed with the bounded head swapped (what-if finds the head, or says it cannot)
            "verify": "head=softplus",
        },
    )


def all_masked_rows(rows: list[int], source: str) -> Finding | None:
    if not rows:
        return None
    return Finding(
        "data.all_masked_row",
        "error",
        f"pad_mask in {source} masks every key for sample(s) {rows}: attention over them is NaN",
        "drop such samples in the data pipeline, or keep at least one key unmasked per row",
        {"samples": rows},
    )


BUILTIN_SIGNED = ("inbatch_infonce", "infonce_negatives", "gathered_infonce")


def contrastive_health(
    energy: dict[str, float], batch_size: int, candidates: int, loss: str, margin: float | None
) -> Finding | None:
    """Retrieval at or below chance, or positives scored *above* their negatives: by more than
    two standard errors of the paired per-row gap, or at all while retrieval is at or below
    chance (two signals agreeing). An untrained head's noise is no verdict."""
    chance = 1.0 / candidates
    accuracy, gap = energy["retrieval_accuracy"], energy["pos_neg_gap"]
    error = energy["pos_neg_gap_row_std"] / math.sqrt(batch_size)
    sign = gap < -2 * error or (gap < 0 and accuracy <= chance)
    if not sign and accuracy > chance:
        return None
    if margin is not None and sign:
        remedy = (
            "low energy means good: a hinge must be relu(margin + E_pos - E_neg); the seed "
            "report's relu(E_neg - E_pos + margin) pushes positives up"
        )
    elif loss in BUILTIN_SIGNED and not sign:
        # the built-in losses use logits = -E/tau by construction: no sign to check
        remedy = (
            "the model does not yet tell its positive from the negatives: an untrained or "
            "saturated head, or contexts that carry no information about the action"
        )
    else:
        remedy = (
            "check the sign convention (logits = -E / tau) and that positives and negatives are "
            "not swapped; an untrained head ranks at chance"
        )
    said = (
        f"positives score higher energy than negatives (gap neg - pos = {gap:.3g})"
        if sign
        else f"retrieval accuracy {accuracy:.3g} is at or below chance 1/{candidates}"
    )
    return Finding(
        "contrastive.wrong_sign" if sign else "contrastive.at_chance",
        "error",
        f"{said} under loss {loss}",
        remedy,
        {
            "retrieval_accuracy": accuracy,
            "chance": chance,
            "pos_neg_gap": gap,
            "gap_standard_error": error,
            "margin": margin,
        },
    )


def stuck_between_floor_and_chance(
    position: float | None, energy: dict[str, float], tau: float | None, bounded: bool = False
) -> Finding | None:
    """A loss above its floor whose logits cannot spread enough to go lower."""
    spread = energy.get("logit_spread_row_mean")
    if position is None or spread is None or not 0.1 <= position < 0.95 or spread >= 1.0:
        return None  # at chance (>= 0.95) is loss.at_chance's finding, not this one
    return Finding(
        "loss.stuck",
        "error",
        f"the loss sits {position:.0%} of the way from its floor to chance with a logit spread of "
        f"only {spread:.3g} per row at tau {tau:g}: too small a range to learn from",
        _spread_remedy(bounded),
        {
            "position": position,
            "logit_spread_row_mean": spread,
            "tau": tau,
            "bounded_head": bounded,
        },
    )


def dead_gradients(grad_norms: dict[str, float], step: int) -> Finding | None:
    dead = [layer for layer, norm in grad_norms.items() if norm == 0.0]
    if not dead or len(dead) == len(grad_norms):
        return None
    return Finding(
        "gradient.dead",
        "warning",
        f"{len(dead)} layer(s) receive exactly zero gradient at step {step}: {', '.join(dead[:5])}",
        "a dead path: a saturated or collapsed op upstream, a detached tensor, or a ReLU that "
        "never fires; the saturation table shows which",
        {"layers": dead, "step": step},
    )


def unreachable_margin(margin: float | None, bounds: tuple[float, float] | None) -> Finding | None:
    if margin is None or bounds is None or margin < bounds[1] - bounds[0]:
        return None
    span = bounds[1] - bounds[0]
    return Finding(
        "head.unreachable_margin",
        "error",
        f"the hinge margin {margin:g} is at least the whole energy range the head allows "
        f"({bounds[0]:.3g}..{bounds[1]:.3g}, span {span:.3g}): no pair can satisfy it",
        "use a margin well below the span, or a wider/unbounded energy head",
        {"margin": margin, "head_bounds": list(bounds)},
    )


def coarse_inputs(half: dict[str, str], energy: dict[str, float]) -> Finding | None:
    """bfloat16 keeps 8 significant bits: relative steps of 2^-8 (about 0.4%)."""
    if not half:
        return None
    gap, scale = abs(energy["pos_neg_gap"]), max(abs(energy["energy_mean"]), 1e-12)
    resolution = 2.0**-8 if "bfloat16" in half.values() else 2.0**-11
    if gap / scale >= resolution:
        return None
    return Finding(
        "data.coarse_inputs",
        "warning",
        f"inputs {', '.join(f'{k} ({v})' for k, v in half.items())} resolve relative differences of "
        f"~{resolution:.2g}, coarser than the relative energy gap {gap / scale:.2g} the loss must learn",
        "cast the policy's hidden states to float32 before detaching them for the energy model, "
        "or widen the energy range",
        {"inputs": half, "relative_gap": gap / scale, "resolution": resolution},
    )


def gap_below_autocast_resolution(dtype: str | None, energy: dict[str, float]) -> Finding | None:
    """Under autocast the energies are computed in ``dtype``: at magnitude |E| it resolves
    steps of |E| * 2^-mantissa, and a positive-negative gap below that is rounding noise."""
    bits = {"bfloat16": 8, "float16": 11}.get(dtype or "")
    if bits is None:
        return None
    magnitude = max(abs(energy["energy_max"]), abs(energy["energy_min"]), 1e-30)
    resolution = magnitude * 2.0**-bits
    gap = abs(energy["pos_neg_gap"])
    if gap >= resolution:
        return None
    return Finding(
        "precision.gap_below_resolution",
        "warning",
        f"the energy gap {gap:.3g} is below what {dtype} resolves at |E| ~ {magnitude:.3g} "
        f"(steps of {resolution:.3g}): under autocast the loss sees rounding, not the gap",
        "compute the energy head in float32 (autocast(enabled=False) around it), or rescale the "
        "energies so the gap is a larger fraction of their magnitude",
        {"dtype": dtype, "gap": gap, "magnitude": magnitude, "resolution": resolution},
    )


def model_raised(step: int, message: str) -> Finding:
    return Finding(
        "model.raised",
        "error",
        f"the model or loss raised on the batch of step {step}: {message}",
        "the model guards itself (non-finite tensor, all-masked row): `energydiag replay` on the "
        "step localises what tripped the guard",
        {"step": step, "exception": message},
    )


SWAP_LOSSES = ("inbatch_infonce", "gathered_infonce")


def rank_negatives(
    loss: str, local_batch: int, world: int, synchronised: bool = True
) -> Finding | None:
    """How many negatives each positive meets in a multi-rank swap InfoNCE, local or gathered:
    8 ranks of 3 samples give 2 negatives per positive without a gather, 23 with one. Ranks
    that are not ``synchronised`` each train their own copy on their local batch alone."""
    if world < 2 or loss not in SWAP_LOSSES or local_batch < 1:
        return None
    gathered = loss == "gathered_infonce"
    whole = local_batch * world
    negatives = whole - 1 if gathered else local_batch - 1
    evidence = {
        "local_batch": local_batch,
        "world_size": world,
        "negatives": negatives,
        "gathered": gathered,
        "synchronised": synchronised,
    }
    if gathered:
        return Finding(
            "ranks.negatives",
            "info",
            f"each positive meets {negatives} negatives gathered from {world} ranks of "
            f"{local_batch} (chance log({whole}) = {math.log(whole):.3f})",
            "nothing to change: the loss already sees every rank's actions",
            evidence,
        )
    if not synchronised:
        return _own_copies(local_batch, world, evidence)
    return Finding(
        "ranks.negatives",
        "warning" if local_batch <= 16 else "info",
        f"each positive meets only {negatives} in-batch negative(s): the loss scores the "
        f"{local_batch} actions of its own rank (chance log({local_batch}) = "
        f"{math.log(local_batch):.3f}) while {world} ranks hold {whole}",
        f"gather the actions across ranks for the negatives (loss 'gathered_infonce', or an "
        f"all_gather in your loss): {whole - 1} negatives, chance log({whole}) = "
        f"{math.log(whole):.3f}, and a loss floor the narrow heads reach less easily",
        evidence,
    )


def _own_copies(local: int, world: int, evidence: dict[str, Any]) -> Finding:
    """The remedies that change the effective batch, best first; the story verifies the first."""
    whole = local * world
    title = (
        f"each rank trains its own copy on B_local = {local} samples: {local - 1} negatives per "
        f"positive (chance log {local} = {math.log(local):.2f}) instead of {whole - 1} "
        f"(log {whole} = {math.log(whole):.2f})"
    )
    remedy = (
        f"1. wrap the model in DDP and gather the actions across ranks for the negatives "
        f"(loss 'gathered_infonce'): one model, {whole - 1} negatives per positive "
        f"(what-if variant gather=all); 2. DDP alone: one model averaging all {whole} samples' gradients, "
        f"still {local - 1} negatives (variant ddp); 3. a larger local batch"
    )
    evidence = evidence | {
        "verify": "gather=all",
        "link": {"stage": 0, "what": f"each rank trains its own copy on {local} samples"},
    }
    tries = Invocation("whatif", options={"tries": ["gather=all", "ddp"]})
    return Finding("ranks.negatives", "error", title, remedy, evidence, [tries])


def rank_first_nonfinite(
    step: int, origin: list[int], received: list[dict[str, Any]], world: int
) -> Finding | None:
    """Every rank logs its own loss: the rank(s) whose loss went non-finite first, and the others
    as received (their gradient norm through the all-reduce, their loss a step later)."""
    if len(origin) == world:
        return None  # every rank at once: nothing rank-local to say
    ranks = ", ".join(str(r) for r in origin)
    said = [
        f"rank {r['rank']} received it through the all-reduce (gradient norm at step "
        f"{r['first_nonfinite_grad_norm']}, loss at step {r['first_nonfinite_loss']})"
        for r in received
    ]
    return Finding(
        "ranks.first_nonfinite",
        "error",
        f"rank {ranks}'s own loss went non-finite first, at step {step}"
        + (f"; {'; '.join(said)}" if said else ""),
        f"the fault is local to rank {ranks}: replay the run on its ranks from the checkpoint "
        f"before step {step}, and look at rank {ranks}'s batch of that step",
        {"step": step, "ranks": origin, "received": received, "world_size": world},
        [Invocation("replay", options={"from_step": step})],
    )
