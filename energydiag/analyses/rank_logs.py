"""What a multi-rank run's own records say about its ranks: which rank went non-finite first
and which received it (every rank's log), whether the ranks held the same parameters (rank 0's
comparisons), and how many negatives each positive met.

Under DDP a NaN born on one rank reaches the others through the gradient all-reduce: their own
loss at that step is still finite, their gradient norm is not, and their loss goes non-finite a
step later. Rank 0's log alone would date the fault one step late and on the wrong rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from energydiag import findings as rules
from energydiag.io.scalars import first_nonfinite
from energydiag.schema import Record

if TYPE_CHECKING:  # a curve's rank rows are read without torch, which the run's module imports
    from energydiag.io.rundir import Run


@dataclass
class RankLog(Record):
    rank: int
    first_nonfinite_loss: int | None
    first_nonfinite_grad_norm: int | None

    @property
    def first(self) -> int | None:
        steps = [
            s for s in (self.first_nonfinite_loss, self.first_nonfinite_grad_norm) if s is not None
        ]
        return min(steps, default=None)


def rank_logs(run: Run) -> list[RankLog]:
    """One row per rank of a multi-rank run; empty for a single-process run."""
    if not run.manifest.distributed:
        return []
    rows = []
    for rank in range(run.manifest.world_size):
        logged = run.of_rank(rank).logged_series(("loss", "grad_norm"))  # one read per rank
        loss, norm = first_nonfinite(logged["loss"]), first_nonfinite(logged["grad_norm"])
        rows.append(RankLog(rank, loss, norm))
    return rows


def rank_finding(rows: list[RankLog]) -> rules.Finding | None:
    """Which rank's own loss went non-finite first, and how the others received it."""
    born = [r for r in rows if r.first_nonfinite_loss is not None]
    if not born:
        return None
    step = min(r.first_nonfinite_loss for r in born)
    origin = [r.rank for r in born if r.first_nonfinite_loss == step]
    received = [r for r in rows if r.rank not in origin and r.first is not None]
    return rules.rank_first_nonfinite(step, origin, [r.to_dict() for r in received], len(rows))


def rank_findings(run: Run) -> list[rules.Finding]:
    """Every finding the run's records support about its ranks, without replaying anything."""
    if not run.manifest.distributed:
        return []
    found = [rank_finding(rank_logs(run)), divergence(run)]
    found += [negatives(run)] if run.manifest.rank_copies else []
    return [f for f in found if f is not None]


def divergence(run: Run) -> rules.Finding | None:
    distributed = run.manifest.distributed or {}
    unsynced = [path for path, how in distributed.get("sync", {}).items() if how == "none"]
    return rules.rank_divergence(
        run.rank_checks(), distributed.get("parallelism", ""), run.manifest.world_size, unsynced
    )


def negatives(run: Run) -> rules.Finding | None:
    """Negatives per positive, from the first logged batch's actions and the world size."""
    first = run.batch_steps[0] if run.batch_steps else None
    actions = run.batch(first).tensors.get("a_pos") if first is not None else None
    local = actions.shape[0] if actions is not None else 0
    return rules.rank_negatives(
        run.manifest.loss.label, local, run.manifest.world_size, not run.manifest.rank_copies
    )
