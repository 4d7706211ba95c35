"""Rules about the ranks of a multi-rank run holding different parameters."""

from __future__ import annotations

from typing import Any

from energydiag.findings.base import Finding, Invocation

ORDER_NOISE = 1e-5  # relative: replicas that differ by less differ by float rounding


def rank_divergence(
    checks: list[dict[str, Any]], parallelism: str, world: int, unsynced: list[str]
) -> Finding | None:
    """``checks``: the run's rank comparisons (step, equal, ranks, max_relative, layers) in step
    order. The first one where copies differ, by how much, which layers, and why: no gradient
    sync (``unsynced``: the module paths nothing keeps equal, '' for the whole model),
    reduction-order noise, or a rank-local change to synchronised parameters."""
    differing = [c for c in checks if not c["equal"]]
    if not differing:
        return None
    first, worst = differing[0], max(differing, key=lambda c: c["max_relative"])
    equal_before = [c["step"] for c in checks if c["equal"] and c["step"] < first["step"]]
    since = f" (equal at step {equal_before[-1]})" if equal_before else ""
    layers = ", ".join(list(worst["layers"])[:3]) or "some parameters"
    evidence = {
        "first_step": first["step"],
        "last_equal_step": equal_before[-1] if equal_before else None,
        "ranks": first["ranks"],
        "max_relative": worst["max_relative"],
        "worst_step": worst["step"],
        "layers": worst["layers"],
        "parallelism": parallelism,
        "unsynchronised": unsynced,
    }
    head = (
        f"the {world} ranks' parameters differ from step {first['step']}{since}: the norms of "
        f"{layers} differ by up to {worst['max_relative']:.3g} (relative) by step {worst['step']}"
    )
    if unsynced:
        return _no_sync(head, evidence, world)
    if worst["max_relative"] < ORDER_NOISE:
        return _order_noise(head, evidence)
    return _rank_local(head, evidence)


def _no_sync(head: str, evidence: dict[str, Any], world: int) -> Finding:
    unsynced, step = evidence["unsynchronised"], evidence["first_step"]
    what = "the model" if unsynced == [""] else f"'{next(p for p in unsynced if p)}'"
    evidence |= {
        "cause": "no gradient sync",
        "link": {
            "stage": 2,
            "step": step,
            "what": f"the {world} ranks' copies differ from step {step} (no sync)",
        },
    }
    return Finding(
        "ranks.diverged",
        "error",
        f"{head} — no gradient sync: {what} is not wrapped in DDP or FSDP, so each rank trains "
        "its own copy with its own optimizer",
        "wrap it in DistributedDataParallel (or shard it with fully_shard) so every rank applies "
        f"the same averaged gradient; as it is, a saved copy is one of {world} models, each "
        f"trained on 1/{world} of the data",
        evidence,
    )


def _order_noise(head: str, evidence: dict[str, Any]) -> Finding:
    return Finding(
        "ranks.diverged",
        "info",
        f"{head} — within float rounding: non-deterministic kernels or reduction order (about "
        "1e-7 relative per step)",
        "nothing to change unless bit-identical replicas matter; deterministic algorithms "
        "(torch.use_deterministic_algorithms) remove most of it",
        evidence | {"cause": "reduction order"},
    )


def _rank_local(head: str, evidence: dict[str, Any]) -> Finding:
    return Finding(
        "ranks.diverged",
        "error",
        f"{head} — beyond float rounding although {evidence['parallelism']} synchronises the "
        "gradients: something changed parameters on some ranks only (a rank-local optimizer "
        "step or lr, rank-conditioned code, a load on one rank)",
        "look for code that runs on some ranks only between backward and the next forward; "
        "replay from the last checkpoint where they agreed",
        evidence | {"cause": "rank-local change"},
        [Invocation("replay", options={"from_step": evidence["last_equal_step"] or 0})],
    )
