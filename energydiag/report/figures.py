"""The report page's figures beyond the per-command plots: the energy matrix, the layer norms
over checkpoints and saturation per squashing op. Each draws an already-computed JSON part."""

from __future__ import annotations

import math
from typing import Any

from energydiag.report.plot import layer_lines, number


def energy_matrix_figure(batch: dict[str, Any], plt: Any) -> Any:
    """E_ij = E(h_i, a_j): the diagonal (each context with its own action) should be the lowest
    of its row. Non-finite cells are drawn as hatched grey, not as a colour."""
    import numpy as np

    matrix = np.array([[number(v) for v in row] for row in batch["energy_matrix"]])
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    shown = np.ma.masked_invalid(matrix)
    image = ax.imshow(shown, cmap="viridis")
    ax.set_facecolor("0.8")
    if shown.mask.any():
        ax.patch.set_hatch("xx")
    # "%.7g" writes a saturated head's 0.99999x energies out instead of as an offset
    fig.colorbar(image, ax=ax, label="energy", format="%.7g")
    n = len(matrix)
    ax.plot(range(n), range(n), "s", mfc="none", mec="red", ms=max(3, 220 / max(n, 1)), mew=1.2)
    ax.set_xlabel("action j")
    ax.set_ylabel("context i")
    return fig


def layer_norms_figure(timeline: dict[str, Any], plt: Any) -> Any:
    steps = [r["step"] for r in timeline["rows"]]
    fig, (weights, grads) = plt.subplots(1, 2, figsize=(11, 4.2))
    layer_lines(weights, steps, timeline["layer_l2"])
    weights.set_title("Parameter L2 norm per layer", fontsize=10)
    grads.set_title("Gradient average ‖exp_avg‖ per layer (from optimizer state)", fontsize=10)
    if any(number(v) > 0 for values in timeline["layer_grad"].values() for v in values):
        layer_lines(grads, steps, timeline["layer_grad"])
    else:
        grads.text(0.5, 0.5, "no gradient average in these checkpoints", ha="center")
    for ax in (weights, grads):
        ax.set_xlabel("checkpoint step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def saturation_figure(rows: list[dict[str, Any]], plt: Any) -> Any:
    labels = [f"{r['module']} {r['op'].removeprefix('aten::')}" for r in rows]
    fractions = [number(r["fraction"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    bars = ax.barh(labels, [0 if math.isnan(f) else f for f in fractions], color="tab:orange")
    ax.bar_label(bars, labels=[f"{f:.1%}" for f in fractions], padding=3, fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of outputs saturated")
    return fig


def landscape_figure(report: dict[str, Any], plt: Any, shown: int = 8) -> Any:
    """Per context: the energy along the refinement chain, and along the straight path from its
    start to its end (both in eval mode), the demonstration's energy dashed."""
    rows = report["rows"][:shown]
    fig, (chain_ax, line_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        (drawn,) = chain_ax.plot(r["energy_chain"], lw=1.2, label=f"context {r['row']}")
        chain_ax.axhline(r["demo_energy"], color=drawn.get_color(), ls=":", lw=0.8)
        steps = len(r["energy_line"]) - 1
        line_ax.plot([i / steps for i in range(steps + 1)], r["energy_line"], lw=1.2)
    chain_ax.set(title="energy along the refinement (dotted: the demonstration)",
                 xlabel="refinement step", ylabel="energy")  # fmt: skip
    line_ax.set(title="energy on the straight path a0 → aT", xlabel="fraction of the way")
    chain_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
