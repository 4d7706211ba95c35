"""Rules over an inference-time refinement under the energy (energydiag landscape)."""

from __future__ import annotations

from typing import Any

from energydiag.findings.base import Finding

RISING = 0.3  # the energy rising on this share of refinement steps is a descent that fails
SPURIOUS_SHARE = 0.25  # rows whose refined action beats the demonstration far from it


def train_mode_refinement(modules: list[str], gap: dict[str, float]) -> Finding | None:
    """The seed team's bug: the head's dropout live while the policy descends it."""
    if not modules:
        return None
    return Finding(
        "landscape.train_mode",
        "error",
        f"{len(modules)} dropout/batch-norm module(s) ran in training mode during the "
        f"refinement ({', '.join(modules[:4])}): on the same input the energy differs between "
        f"train and eval mode by {gap['mean']:.3g} on average, {gap['max']:.3g} at most",
        "call model.eval() before refining actions (and model.train() after, if training goes "
        "on): the refiner descends a landscape that moves with every dropout draw",
        {"modules": modules, "mode_gap": gap},
    )


def energy_rises(rising: float, alpha: float | None, stable_alpha: float | None) -> Finding | None:
    if rising < RISING:
        return None
    at = f" at step size {alpha:g}" if alpha is not None else ""
    stable = (
        f"; halving, the largest α where it rises on < 10% of steps is {stable_alpha:g}"
        if stable_alpha is not None
        else ""
    )
    return Finding(
        "landscape.energy_rises",
        "error",
        f"the energy rises on {rising:.0%} of refinement steps{at}: the steps overshoot the "
        f"landscape instead of descending it{stable}",
        f"use a step size ≤ {stable_alpha:g}"
        if stable_alpha is not None
        else "take smaller steps, or a line search on the energy",
        {"rising_fraction": rising, "alpha": alpha, "stable_alpha": stable_alpha},
    )


def spurious_basin(rows: list[dict[str, Any]]) -> Finding | None:
    """Refined actions with lower energy than the demonstration, far from it."""
    far = [r for r in rows if r["chosen_energy"] < r["demo_energy"] and r["far_from_demo"]]
    if not rows or len(far) / len(rows) < SPURIOUS_SHARE:
        return None
    return Finding(
        "landscape.spurious_basin",
        "warning",
        f"{len(far)} of {len(rows)} refined actions reach lower energy than their demonstration "
        "while moving far from it: the energy has basins the data does not support",
        "train with negatives near the demonstrations (perturbed actions) or a gradient "
        "penalty, and cap how far refinement may move an action",
        {"rows": [r["row"] for r in far]},
    )
