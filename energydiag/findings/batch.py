"""What the batch itself shows, before any contrastive statistic: inputs whose scale drowns
their information, too few negatives to learn from, a forward that is already non-finite, and
batches or tensors the loss in use does not judge."""

from __future__ import annotations

import math

from energydiag.findings.base import Finding, Invocation

FEW_NEGATIVES = 4  # fewer negatives per positive than this and chance itself is a low bar


def few_negatives(candidates: int, position: float | None) -> Finding | None:
    """Swap InfoNCE scores each positive against the batch's other actions: with B = 3 that is
    2 negatives, chance log 3 = 1.10, and a weak signal per step whatever the head."""
    negatives = candidates - 1
    if negatives >= FEW_NEGATIVES or negatives < 1 or position is None or position < 0.5:
        return None
    return Finding(
        "contrastive.few_negatives",
        "error" if position >= 0.9 else "warning",
        f"each positive meets only {negatives} negative(s) (B = {candidates}): chance is "
        f"log({candidates}) = {math.log(candidates):.3f} and the loss sits {position:.0%} of the "
        "way from its floor to it",
        "raise the negatives per positive: a larger batch, negatives gathered across ranks "
        "('gathered_infonce'), or a bank of past actions",
        {
            "negatives": negatives,
            "candidates": candidates,
            "position": position,
            "link": {
                "stage": 0,
                "what": f"only {negatives} negative(s) per positive (B = {candidates})",
            },
            # the same data, k batches a step: at least 8 candidates per positive
            "verify": f"batch*={math.ceil(8 / candidates)}",
        },
    )


OFFSET_RATIO = 10.0  # an input's constant part this many times its variation, and other inputs'


def input_offset(scales: dict[str, dict[str, float]]) -> Finding | None:
    """One input path carrying a large constant (a context never normalised, a sensor with a
    bias): its scale, not its information, then drives the energy, often into a bounded head's
    saturation. ``scales``: per float input, the RMS of its per-feature means (offset), of its
    per-feature standard deviations (spread), and its overall RMS."""
    for key, s in scales.items():
        others = [o["rms"] for k, o in scales.items() if k != key]
        if not others or s["offset"] < OFFSET_RATIO * max(s["spread"], max(others)):
            continue
        return Finding(
            "data.input_offset",
            "warning",
            f"input '{key}' carries a constant offset: its per-feature means have RMS "
            f"{s['offset']:.3g} against a spread of {s['spread']:.3g}, while the other inputs' RMS "
            f"is at most {max(others):.3g}",
            f"normalise '{key}' before the model (subtract its mean, or a LayerNorm at the input)",
            {
                "input": key,
                **s,
                "others_rms": max(others),
                "link": {
                    "stage": 0,
                    "what": f"'{key}' offset by ~{s['offset']:.3g} (spread {s['spread']:.3g})",
                },
                "verify": f"center={key}",
            },
        )
    return None


def forward_nonfinite(step: int, loss: float, nonfinite: int, total: int) -> Finding:
    """The inspected batch's own forward is non-finite: energy statistics would be NaN's."""
    return Finding(
        "inspect.nonfinite_forward",
        "error",
        f"the model's forward on the batch of step {step} is non-finite: loss {loss:.4g}, "
        f"{nonfinite} of {total} energies NaN or Inf; no energy statistics are computed from them",
        "a replay from this step names the op and module where it began",
        {"step": step, "loss": loss, "nonfinite_energies": nonfinite, "energies": total},
        [Invocation("replay", options={"from_step": step})],
    )


def not_an_energy_batch(step: int, keys: list[str]) -> Finding:
    """A stated skip: "No findings" would say the batch was judged and found fine."""
    return Finding(
        "inspect.not_energy_batch",
        "info",
        f"the batch of step {step} was not judged: it holds {', '.join(keys[:6])}, not the "
        "energy-model layout (h, a_pos, pad_mask)",
        "the checkpoint's statistics above still hold; the energy statistics need a batch with "
        "'h' and 'a_pos'",
        {"step": step, "keys": keys},
    )


def unused_negatives(loss: str, keys: list[str]) -> Finding | None:
    """Explicit negatives in the batch that the loss in use never reads."""
    if "a_neg" not in keys or loss not in ("inbatch_infonce", "gathered_infonce"):
        return None
    return Finding(
        "inspect.unused_negatives",
        "info",
        f"the batch holds 'a_neg', which {loss} ignores (it scores the in-batch actions)",
        "to judge those negatives, inspect with a loss that reads them (infonce_negatives, margin)",
        {"loss": loss},
        [Invocation("inspect", "CKPT", {"loss": "infonce_negatives"})],
    )
