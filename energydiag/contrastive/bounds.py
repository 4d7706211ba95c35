"""What an InfoNCE loss can reach, and which losses are InfoNCE: one answer for every command.

A loss is judged against chance (log of its candidates) and, for a bounded head, the floor its
energy span allows at its temperature. Which candidates it scores depends on the loss: the
batch (in-batch swap), the batch of every rank (gathered), or 1 + M explicit negatives.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TYPE_CHECKING

from energydiag.io.manifest import LossSpec, Manifest

if TYPE_CHECKING:  # the bounds themselves are arithmetic: `curves` on a log needs no torch
    from energydiag.io.rundir import Batch


class Candidates(Enum):
    IN_BATCH = "in-batch"  # B: every context against every action of the batch
    GATHERED = "gathered"  # B · world size: the actions of every rank
    NEGATIVES = "negatives"  # 1 + M: the positive against its own M negatives


def scored_candidates(loss: LossSpec) -> Candidates | None:
    """What an InfoNCE loss scores each context against; None for a loss that is not InfoNCE.
    A custom loss with a temperature is taken as in-batch InfoNCE, as the seed team's is."""
    named = {
        "inbatch_infonce": Candidates.IN_BATCH,
        "gathered_infonce": Candidates.GATHERED,
        "infonce_negatives": Candidates.NEGATIVES,
    }
    if loss.name is not None:
        return named.get(loss.name)
    return Candidates.IN_BATCH if "tau" in loss.kwargs else None


def candidate_count(kind: Candidates, batch: Batch, manifest: Manifest) -> int | None:
    if kind is Candidates.NEGATIVES:
        negatives = batch.tensors.get("a_neg")
        return 1 + negatives.shape[1] if negatives is not None else None
    size = batch.tensors["h"].shape[0] if "h" in batch.tensors else None
    if size is None or kind is Candidates.IN_BATCH:
        return size
    return size * manifest.world_size


def infonce_bounds(batch_size: int, tau: float, energy_span: float) -> dict[str, float]:
    """What InfoNCE over B candidates can reach when energies differ by at most ``energy_span``.

    floor: positive at the lowest energy, every negative at the highest.
    chance: all logits equal (no discrimination), log B.
    worst: positive at the highest energy, every negative at the lowest.
    """
    b, gap = batch_size, energy_span / tau
    if math.isinf(gap):
        return {"floor": 0.0, "chance": math.log(b), "worst": math.inf}
    return {
        "floor": math.log1p((b - 1) * math.exp(-gap)),
        "chance": math.log(b),
        "worst": math.log1p((b - 1) * math.exp(gap)),
    }


def infonce_curve_bounds(
    batch_size: int, tau: float, energy_span: float | None
) -> dict[str, float]:
    """Chance (log B) always; the floor too when the head's energy span is bounded."""
    b = infonce_bounds(batch_size, tau, energy_span if energy_span is not None else math.inf)
    out = {"chance": b["chance"], "batch_size": batch_size, "tau": tau}
    if energy_span is not None and math.isfinite(energy_span):
        out |= {"floor": b["floor"], "energy_span": energy_span}
    return out
