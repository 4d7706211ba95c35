"""PNG rendering (optional: pip install 'energydiag[plot]'). Draws what analyses computed."""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path
from typing import Any

from energydiag.errors import DiagError
from energydiag.io.atomic import replacing


def pyplot(path: Path | None = None):
    if importlib.util.find_spec("matplotlib") is None:
        raise DiagError(path, "writing PNG plots needs: pip install 'energydiag[plot]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(report: dict[str, Any], path: Path) -> None:
    _save(curve_figure(report, pyplot(path)), path)


def curve_figure(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(10, 4.5))
    d = report["display"]
    ax.plot(d["step"], d["value"], lw=0.8, alpha=0.5, label=report["metric"])
    ax.plot(d["step"], d["smooth"], lw=1.6, label="rolling median")
    for seg, colour, name in (
        [(p, "tab:orange", "plateau") for p in report["plateaus"]]
        + [(c, "tab:red", "constant") for c in report["constant"]]
        + [(o, "tab:purple", "oscillation") for o in report["oscillations"]]
    ):
        ax.axvspan(seg["start"], seg["end"], color=colour, alpha=0.15, label=name)
    if report["divergence"]:
        ax.axvspan(
            report["divergence"]["start"],
            report["divergence"]["end"],
            color="tab:red",
            alpha=0.2,
            label="divergence",
        )
    for s in report["spikes"]:
        ax.plot(s["step"], s["value"], "rx")
    bounds = report["bounds"] or {}
    for key, style in (("chance", "--"), ("floor", ":")):
        if key in bounds:
            ax.axhline(bounds[key], color="k", ls=style, lw=1, label=f"{key} {bounds[key]:.3f}")
    if report["first_nonfinite"] is not None:
        ax.axvline(report["first_nonfinite"], color="red", lw=1.5, label="first non-finite")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xlabel("step")
    return fig


def whatif(report: dict[str, Any], path: Path) -> None:
    _save(whatif_figure(report, pyplot(path)), path)


def whatif_figure(report: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    start = report["from_step"]
    for r in sorted(report["results"], key=lambda x: x["rank"]):
        ax.plot(
            range(start, start + len(r["losses"])),
            r["losses"],
            lw=2 if r["label"] == "baseline" else 1.2,
            label=f"{r['rank']}. {r['label']}",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    return fig


def landscape(report: dict[str, Any], path: Path) -> None:
    from energydiag.report.figures import landscape_figure

    _save(landscape_figure(report, pyplot(path)), path)


def timeline(report: dict[str, Any], path: Path) -> None:
    _save(timeline_figure(report, pyplot(path)), path)


def timeline_figure(report: dict[str, Any], plt: Any) -> Any:
    """max|w| of every layer over the checkpoints, log scale: an explosion is a cliff."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    layer_lines(ax, [r["step"] for r in report["rows"]], report["layers"])
    exploded = [r["step"] for r in report["rows"] if r["exploded"]]
    if exploded:
        ax.axvline(
            exploded[0], color="red", lw=1.2, ls="--", label=f"exploded from step {exploded[0]}"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("max |w| per layer")
    ax.set_title("Weights over checkpoints (five largest layers labelled)")
    ax.legend(fontsize=8)
    return fig


def layer_lines(ax: Any, steps: list[int], layers: dict[str, list[Any]], top: int = 5) -> None:
    """One line per layer, log scale; the ``top`` largest drawn bold and labelled."""

    def peak(values: list[Any]) -> float:
        return max((v for v in map(number, values) if math.isfinite(v)), default=0.0)

    ranked = sorted(layers.items(), key=lambda kv: -peak(kv[1]))
    for i, (layer, values) in enumerate(ranked):
        points = [(s, number(v)) for s, v in zip(steps, values, strict=True)]
        points = [(s, v) for s, v in points if math.isfinite(v) and v > 0]
        if points:
            xs, ys = zip(*points, strict=True)
            bold = i < top
            ax.plot(
                xs,
                ys,
                lw=1.8 if bold else 0.8,
                alpha=1 if bold else 0.4,
                label=layer if bold else None,
            )
    ax.set_yscale("log")


def number(value: Any) -> float:
    """A number from our JSON: None (not measured) and "NaN"/"Infinity" text included."""
    if value is None:
        return math.nan
    return float(value)


def png(fig: Any) -> bytes:
    """The figure as PNG bytes, for pages that embed their images."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()


def _save(fig: Any, path: Path) -> None:
    """Into a temporary sibling, renamed on success: an interrupted plot leaves nothing."""
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        pyplot().close(fig)
