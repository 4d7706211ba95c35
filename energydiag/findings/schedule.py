"""Rules over the learning-rate trajectory a run recorded: causes, not symptoms.

Each rule states its precondition in the evidence it receives (``ScheduleEvidence.to_dict()``):
no trajectory, no reference lr, or no decoupled decay, and it says nothing.
"""

from __future__ import annotations

import math
from typing import Any

from energydiag.findings.base import Finding

BEYOND_REFERENCE = 10.0  # an lr this many times its configured value is not a schedule's intent


def _lr(evidence: dict[str, Any]) -> dict[int, float]:
    return {int(s): float(v) for s, v in evidence["lr"].items()}


def lr_beyond_reference(evidence: dict[str, Any]) -> Finding | None:
    """The lr went far past what it was configured to be (a LambdaLR whose lambda overshoots,
    a warm-up multiplying instead of dividing)."""
    lr, reference = _lr(evidence), evidence["reference"]
    finite = {s: v for s, v in lr.items() if math.isfinite(v)}
    if not finite or not reference or reference <= 0:
        return None
    peak_step = max(finite, key=finite.get)
    peak = finite[peak_step]
    if peak < BEYOND_REFERENCE * reference:
        return None
    over = next(s for s in sorted(finite) if finite[s] >= BEYOND_REFERENCE * reference)
    first_step = min(finite)
    source = "initial_lr" if evidence["reference_source"] == "initial_lr" else "configured lr"
    return Finding(
        "schedule.lr_beyond_configured",
        "error" if peak >= 100 * reference else "warning",
        f"lr goes {finite[first_step]:.3g} → {peak:.3g} over steps {first_step}–{peak_step}, "
        f"×{peak / reference:.3g} its {source} {reference:.3g} (past ×{BEYOND_REFERENCE:g} "
        f"from step {over}; recorded per step)",
        "fix the schedule so it never exceeds the configured lr (a LambdaLR's lambda multiplies "
        "the configured lr: it should rise to 1, not past it)",
        {
            "reference": reference,
            "peak": peak,
            "peak_step": peak_step,
            "over_step": over,
            "link": {
                "stage": 1,
                "step": first_step,
                "what": f"lr {finite[first_step]:.3g} → {peak:.3g} over steps {first_step}–"
                f"{peak_step} (×{peak / reference:.3g} its {source} {reference:.3g})",
            },
            "verify": f"lr={reference:g}",
        },
    )


def decoupled_decay_unstable(evidence: dict[str, Any]) -> Finding | None:
    """AdamW multiplies every weight by 1 − lr·wd each step, whatever the gradient: past
    lr·wd = 1 the weights flip sign every step, past 2 they also grow geometrically."""
    wd = evidence["weight_decay"]
    if not evidence["decoupled"] or not wd or wd <= 0:
        return None
    # a non-finite lr is a jump (schedule.jump says so), not a decay factor
    unstable = {s: v for s, v in sorted(_lr(evidence).items()) if math.isfinite(v) and v * wd > 1}
    if not unstable:
        return None
    first = next(iter(unstable))
    worst = min(1 - v * wd for v in unstable.values())
    growing = worst < -1
    effect = (
        "the weights flip sign and grow geometrically even where every gradient is zero"
        if growing
        else "the weights flip sign every step"
    )
    return Finding(
        "schedule.decay_factor",
        "error",
        f"AdamW's decoupled decay multiplies the weights by 1 − lr·wd = "
        f"{1 - unstable[first] * wd:.3g} at step {first} (lr {unstable[first]:.3g} × "
        f"weight_decay {wd:g}{_lowest(worst, 1 - unstable[first] * wd, len(unstable))}): "
        f"{effect}",
        "keep lr · weight_decay well below 1 (lower the lr the schedule reaches, or the decay)",
        {
            "first_step": first,
            "steps": len(unstable),
            "weight_decay": wd,
            "worst_factor": worst,
            "link": {
                "stage": 1,
                "step": first,
                "what": f"AdamW decay factor 1 − lr·wd = {1 - unstable[first] * wd:.3g} from step "
                f"{first}{_lowest(worst, 1 - unstable[first] * wd, len(unstable), short=True)}",
            },
        },
    )


def _lowest(worst: float, first: float, steps: int, short: bool = False) -> str:
    """The lowest factor, when it is not the first one already said."""
    if worst == first:
        return "" if short else f"; {steps} step(s)"
    return f" (down to {worst:.3g})" if short else f"; down to {worst:.3g} over {steps} step(s)"
