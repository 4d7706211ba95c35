"""Rules about logged metric curves and what-if rankings."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from energydiag.findings.base import Finding, Invocation


def curve_nonfinite(step: int | None, metric: str) -> Finding | None:
    if step is None:
        return None
    return Finding(
        "curve.nonfinite",
        "error",
        f"'{metric}' is first non-finite at step {step}",
        f"bisect or replay from the checkpoint before step {step}",
        {"step": step},
        [Invocation("replay", options={"from_step": step})],
    )


def curve_plateau(
    plateaus: list,
    on: str | None,
    bounds: dict[str, float] | None,
    metric: str,
    left: dict[str, float] | None = None,
) -> Finding | None:
    """``left``: the loss left the plateau for good (a slow start, then learning)."""
    if not plateaus:
        return None
    p = plateaus[-1]
    evidence = {"plateaus": [asdict(s) for s in plateaus], "bounds": bounds, "sits_on": on}
    where = f"steps {p.start}–{p.end} at {p.level:.4g}"
    if left is not None:
        said = f" (chance log({bounds['batch_size']}))" if on == "chance" else ""
        return Finding(
            "curve.slow_start",
            "info",
            f"'{metric}' is flat over {where}{said}, then leaves it after step "
            f"{left['from_step']} and ends near {left['level_at_end']:.4g}",
            "nothing to fix if the time matters little; a warm-up or a larger lr shortens it",
            evidence | {"left": left},
        )
    if on == "chance":
        return Finding(
            "curve.plateau_at_chance",
            "error",
            f"'{metric}' is flat over {where}: chance level log({bounds['batch_size']}) = "
            f"{bounds['chance']:.4g}, the model does not discriminate at all",
            "no useful gradient reaches the model: inspect a checkpoint from the plateau for a "
            "saturated head or collapsed energies (`energydiag inspect`)",
            evidence
            | {
                "link": {
                    "stage": 4,
                    "step": p.start,
                    "what": f"loss flat at chance log({bounds['batch_size']}) = "
                    f"{bounds['chance']:.4g} over steps {p.start}–{p.end}",
                }
            },
        )
    if on == "floor":
        return Finding(
            "curve.plateau_at_floor",
            "warning",
            f"'{metric}' is flat over {where}: the floor {bounds['floor']:.4g} that an energy "
            f"span of {bounds['energy_span']:.3g} allows at tau {bounds['tau']:g}",
            "the bound, not the optimiser, stops it: widen the energy range or lower tau",
            evidence,
        )
    return Finding(
        "curve.plateau",
        "warning",
        f"'{metric}' is flat over {where}",
        "compare with the bounds that B, tau and the energy span allow, and inspect a checkpoint "
        "from the plateau",
        evidence,
        [Invocation("curves", "LOG", {"batch_size": "B", "tau": "TAU", "energy_span": "SPAN"})],
    )


def curve_constant(segments: list, metric: str, loss_like: bool = True) -> Finding | None:
    """Bit-identical values: alarming in a loss, ordinary in a learning rate or a counter."""
    if not segments:
        return None
    s = max(segments, key=lambda x: x.length)
    if not loss_like:
        return Finding(
            "curve.constant",
            "info",
            f"'{metric}' holds exactly {s.level!r} over steps {s.start}–{s.end}",
            "expected for a schedule or a setting; compare with the loss over the same steps",
            {"segments": [asdict(x) for x in segments]},
        )
    return Finding(
        "curve.constant",
        "error",
        f"'{metric}' repeats exactly {s.level!r} over steps {s.start}–{s.end}",
        "a bit-identical value means nothing changes: a detached graph, a frozen parameter "
        "group, a skipped optimizer step, or a logger that re-logs a stale value",
        {"segments": [asdict(x) for x in segments]},
    )


def curve_divergence(segment: Any, metric: str) -> Finding | None:
    if segment is None:
        return None
    return Finding(
        "curve.divergence",
        "error",
        f"'{metric}' diverges from step {segment.start} (its minimum was {segment.level:.4g})",
        "lower the learning rate, tighten clipping, or replay from just before "
        f"step {segment.start} to see which update starts the rise",
        asdict(segment),
    )


def curve_spikes(spikes: list[dict[str, float]], metric: str) -> Finding | None:
    if not spikes:
        return None
    worst = max(spikes, key=lambda s: abs(s["z"]))
    return Finding(
        "curve.spikes",
        "warning",
        f"{len(spikes)} spike(s) in '{metric}', the largest at step {worst['step']} "
        f"(robust z {worst['z']:.1f})",
        "replay the spiking steps and look at their batches",
        {"spikes": spikes},
        [Invocation("replay", options={"from_step": worst["step"]})],
    )


def curve_oscillation(segments: list, metric: str) -> Finding | None:
    if not segments:
        return None
    return Finding(
        "curve.oscillation",
        "warning",
        f"'{metric}' oscillates step to step over {len(segments)} window(s), first at steps "
        f"{segments[0].start}–{segments[0].end}",
        "an oscillating loss usually means too large a step: lower lr or raise Adam's beta2",
        {"segments": [asdict(x) for x in segments]},
    )


def curve_unstable(segment: Any, metric: str) -> Finding | None:
    if segment is None:
        return None
    return Finding(
        "curve.unstable",
        "warning",
        f"'{metric}' turns erratic after step {segment.start}: its step-to-step changes are "
        f"×{segment.level:.3g} what they were before",
        f"an lr or gradient event near step {segment.start} often does this while everything "
        "stays finite: `energydiag timeline` shows whether the weights jumped there",
        asdict(segment),
    )


def whatif_ranking(results: list[dict[str, Any]]) -> Finding | None:
    base = next(r for r in results if r["label"] == "baseline")
    finite = [r for r in results if r["finite"] and r["relative_drop"] is not None]
    best = max(finite, key=lambda r: r["relative_drop"], default=None)
    if best is None or not base["finite"]:
        return None
    if best["label"] == "baseline" or best["relative_drop"] <= base["relative_drop"]:
        return Finding(
            "whatif.none_better",
            "info",
            "no finite variant beats the baseline over this window",
            "try a longer window (more steps) or other variants",
            {"baseline": base["label"], "baseline_drop": base["relative_drop"]},
        )
    return Finding(
        "whatif.best",
        "info",
        f"'{best['label']}' lowers the loss by {best['relative_drop']:.1%} over the window; the "
        f"baseline's loss {_movement(base['relative_drop'])}",
        f"apply '{best['label']}' to the training configuration and confirm on a longer run",
        {
            "best": best["label"],
            "baseline_drop": base["relative_drop"],
            "best_drop": best["relative_drop"],
        },
    )


def _movement(drop: float | None) -> str:
    """A relative change said the way it went: a rise is never printed as a drop."""
    if drop is None:
        return "did not stay finite"
    return f"falls {drop:.1%}" if drop >= 0 else f"rises {-drop:.1%}"


def whatif_failures(results: list[dict[str, Any]]) -> Finding | None:
    """Variants that went non-finite or raised; the baseline doing so is an error."""
    failed = [r for r in results if not r["finite"]]
    if not failed:
        return None
    base_failed = any(r["label"] == "baseline" for r in failed)
    said = "; ".join(
        f"'{r['label']}' {'raised ' + r['exception'] if r['exception'] else 'went non-finite'} "
        f"at step {r['failed_at']}"
        for r in failed
    )
    return Finding(
        "whatif.baseline_failed" if base_failed else "whatif.variant_failed",
        "error" if base_failed else "warning",
        said,
        "the baseline itself fails in this window: `energydiag replay` localises it before "
        "comparing fixes"
        if base_failed
        else "a fix that fails is ruled out; its message says why",
        {"failed": failed},
    )


def would_have_alarmed(
    alarms: list[dict[str, Any]], first_nonfinite: int | None, unchecked: list[str]
) -> Finding | None:
    """``alarms``: each live monitor's first firing step over the log (rule, step, column)."""
    fired = sorted((a for a in alarms if a["step"] is not None), key=lambda a: a["step"])
    if not fired:
        return None
    first = fired[0]
    others = ", ".join(f"{a['rule']} at {a['step']}" for a in fired[1:])
    ahead = first_nonfinite is not None and first["step"] < first_nonfinite
    lead = (
        f", {first_nonfinite - first['step']} steps before the first non-finite value at step "
        f"{first_nonfinite}"
        if ahead
        else ""
    )
    title = (
        f"the live monitors would have alarmed at step {first['step']} ({first['rule']}){lead}"
        + (f"; then {others}" if others else "")
    )
    evidence = {"alarms": fired, "first_nonfinite": first_nonfinite, "unchecked": unchecked}
    return Finding(
        "curve.would_alarm",
        "warning" if ahead else "info",
        title,
        "record with the Recorder's monitors on (the default) and on_alarm='dump' to keep the "
        "state where the alarm fired, or 'skip' for a bad batch",
        evidence,
    )
