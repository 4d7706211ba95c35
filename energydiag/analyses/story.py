"""The causal chain of a run and the check of its top remedy, from the Case's evidence.

Links come from findings that carry one (a schedule cause, an AdamW decay factor), from the
checkpoint timeline (when the weights crossed ×1e3) and from the localised fault. The remedy of
the earliest cause that names a what-if variant is replayed from the last healthy checkpoint
before the failure, against the run as recorded, over the same batches.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from energydiag import findings as rules
from energydiag.analyses.case import Case
from energydiag.analyses.variants import parse_variant
from energydiag.analyses.whatif import whatif
from energydiag.engine.localise import Fault
from energydiag.errors import DiagError

MAX_VERIFY_STEPS = 256  # a longer window is named for `energydiag whatif`, not replayed here
MIN_STALL_WINDOW = 40  # steps: fewer rarely show a stalled loss moving


def tell(
    case: Case, found: list[rules.Finding], fault: Fault | None, device: torch.device | None
) -> list[rules.Finding]:
    """The chain (when two or more links) and, when one applies, the remedy's verification."""
    causes = sorted(
        (f for f in found if "link" in f.evidence), key=lambda f: _order(f.evidence["link"])
    )
    links = [f.evidence["link"] for f in causes] + _weight_links(case)
    if fault is not None:
        links.append({"stage": 5, "step": fault.step, "what": _fault_clause(fault)})
    fixable = next((f for f in causes if "verify" in f.evidence), None)  # the earliest one
    checked = _verify(case, fixable.evidence["verify"], fault, device) if fixable else None
    lead = fixable or (causes[0] if causes else None)
    remedy = lead.remedy if lead else None
    chain = rules.cause_chain(links, remedy, checked)
    return [chain] if chain else [checked] if checked else []


def _order(link: dict[str, Any]) -> tuple[int, int]:
    return link.get("stage", 5), link.get("step") or 0


def _weight_links(case: Case) -> list[dict[str, Any]]:
    line = case.timeline
    rows = line.rows if line else []
    exploded = next((i for i, r in enumerate(rows) if r.exploded), None)
    if exploded is None:
        return []
    row = rows[exploded]
    before = rows[exploded - 1] if exploded else None
    rate = ""
    if before is not None and row.step > before.step and row.growth_since_previous > 1:
        per_step = row.growth_since_previous ** (1 / (row.step - before.step))
        rate = f", ×{per_step:.3g} per step since checkpoint {before.step}"
    what = (
        f"max|w| ×{row.growth_since_first:.3g} by checkpoint {row.step} "
        f"({row.worst_layer}{rate}), every value finite"
    )
    return [{"stage": 2, "step": row.step, "what": what}]


def _fault_clause(fault: Fault) -> str:
    if fault.op is None:
        return f"non-finite at step {fault.step} ({fault.phase}: {fault.summary})"
    where = f" in '{fault.module}'" if fault.module else ""
    return f"{fault.op.gained} at step {fault.step}{where} ({fault.op.op}, {fault.phase})"


def _verify(
    case: Case, variant: str, fault: Fault | None, device: torch.device | None
) -> rules.Finding | None:
    """Replay the window ending at the fault (or the run's last batch) with and without the
    variant; None when the run lacks the batches or the window is too long to replay here."""
    window = _window(case, fault)
    if window is None:
        return None
    start, stop = window
    try:
        report = whatif(case.run, start, stop - start + 1, [parse_variant(variant)], device)
    except DiagError as err:
        case.notes.append(f"remedy not verified ({variant}): {err}")
        return None
    base = report.baseline
    tried = next(r for r in report.results if r.label != "baseline")
    return rules.remedy_verified(
        {
            "variant": variant,
            "from_step": report.from_step,
            "to_step": report.from_step + report.steps - 1,
            "baseline": _brief(base),
            "variant_result": _brief(tried),
        }
    )


def _window(case: Case, fault: Fault | None) -> tuple[int, int] | None:
    run = case.run
    stop = fault.step if fault is not None else max(run.batch_steps, default=None)
    if stop is None:
        return None
    starts = [s for s in run.checkpoints_with_batches if s <= stop]
    healthy = case.timeline.healthy(starts) if case.timeline else starts
    if not healthy:
        return None
    # a stall needs a window long enough to show a change; a fault, only the steps before it
    long_enough = [s for s in healthy if stop - s + 1 >= MIN_STALL_WINDOW]
    start = healthy[-1] if fault is not None or not long_enough else long_enough[-1]
    if stop - start + 1 > MAX_VERIFY_STEPS:
        case.notes.append(
            f"remedy not verified: {stop - start + 1} steps from checkpoint {start} to step "
            f"{stop} is more than {MAX_VERIFY_STEPS}; run `energydiag whatif` on that window"
        )
        return None
    have = set(run.batch_steps)
    return (start, stop) if all(s in have for s in range(start, stop + 1)) else None


def _brief(result: Any) -> dict[str, Any]:
    kept = asdict(result)
    keys = ("finite", "failed_at", "loss_start", "loss_end", "exception", "saturation")
    keys += ("candidates",)
    return {k: kept[k] for k in keys} | {"input_grad_norm": kept["input_layer_grad_norm"]}
