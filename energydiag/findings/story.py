"""One run, one story: the causes found, in the order they happened, ending in the fault.

The chain is built from findings other rules already made (their evidence carries the steps and
numbers); it adds no judgement of its own beyond ordering. A remedy is verified by a what-if
replay when the run holds the batches; the verdict says what was replayed and what it showed.
"""

from __future__ import annotations

import math
from typing import Any

from energydiag.findings.base import Finding


def cause_chain(
    links: list[dict[str, Any]], remedy: str | None, verification: Finding | None = None
) -> Finding | None:
    """``links``: {"what", "stage", "step"} in any order; two or more make a chain. The
    remedy's verification (``remedy_verified``), when one was made, is said with the remedy."""
    if len(links) < 2:
        return None
    # causes before effects: inputs (0), schedule (1), weights (2), activations (3), the loss
    # (4), the fault (5); by step within a stage
    ordered = sorted(links, key=lambda link: (link.get("stage", 5), link.get("step") or 0))
    said = remedy or "follow the first link: it is the earliest cause the evidence shows"
    evidence: dict[str, Any] = {"links": ordered}
    if verification is not None:
        said = f"{said} — {verification.title}"
        evidence["verification"] = verification.to_dict()
    return Finding(
        "story.chain", "error", " → ".join(link["what"] for link in ordered), said, evidence
    )


LOSS_NOISE = 0.005  # a loss this much lower over the window counts; less is noise at B ~ 8
UNSATURATED = 0.5


def remedy_verified(outcome: dict[str, Any]) -> Finding:
    """``outcome``: the variant, the window replayed, and both sides' results (finite,
    failed_at, loss_start/end, saturation, input_grad_norm)."""
    variant, start, stop = outcome["variant"], outcome["from_step"], outcome["to_step"]
    base, tried = outcome["baseline"], outcome["variant_result"]
    shown = _improvement(base, tried)
    if shown:
        title = (
            f"verified: with {variant} the replay from checkpoint {start} to step {stop} {shown}"
        )
        return Finding("remedy.verified", "info", title, _loss_words(tried), outcome)
    why = (
        f"it went non-finite at step {tried['failed_at']}"
        if not tried["finite"]
        else f"its loss ends at {tried['loss_end']:.4g}, no better than {base['loss_end']:.4g}"
    )
    return Finding(
        "remedy.not_verified",
        "warning",
        f"not verified: with {variant} the replay from checkpoint {start} to step {stop}: {why}",
        "the cause chain may be incomplete: replay longer (`energydiag whatif`) or look at the "
        "other findings",
        outcome,
    )


def _improvement(base: dict[str, Any], tried: dict[str, Any]) -> str | None:
    """What the variant changed for the better, in numbers; None when nothing measurable."""
    if not tried["finite"]:
        return None
    if not base["finite"]:
        return (
            f"stays finite, where the run as recorded goes non-finite at step {base['failed_at']}"
        )
    said = []
    b, t = base.get("candidates") or 0, tried.get("candidates") or 0
    if b > 1 and t > 1 and b != t:  # losses over different B compare only against their chance
        ours, theirs = tried["loss_end"] / math.log(t), base["loss_end"] / math.log(b)
        if ours < theirs - LOSS_NOISE:
            said.append(
                f"ends at {ours:.0%} of its chance log({t}) (loss {tried['loss_end']:.4g}) against "
                f"{theirs:.0%} of log({b}) as recorded"
            )
    elif tried["loss_end"] < base["loss_end"] - LOSS_NOISE:
        said.append(f"ends at loss {tried['loss_end']:.4g} against {base['loss_end']:.4g}")
    was, now = base.get("saturation"), tried.get("saturation")
    if was is not None and now is not None and was >= 0.9 and now < UNSATURATED:
        grads = base.get("input_grad_norm"), tried.get("input_grad_norm")
        more = f", the first layer's gradient ×{grads[1] / grads[0]:.3g}" if all(grads) else ""
        said.append(f"un-saturates the head ({was:.0%} → {now:.0%}{more})")
    return "; ".join(said) or None


def _loss_words(result: dict[str, Any]) -> str:
    return (
        f"apply it to the run: over the replayed window the loss goes {result['loss_start']:.4g} "
        f"→ {result['loss_end']:.4g}"
    )
