"""Rules about checkpoints: non-finite values, outliers, Adam blow-up risk, autocast range,
exploded-but-finite weights, and the bisect search over them.
"""

from __future__ import annotations

import math
from typing import Any

from energydiag.findings.base import Finding, Invocation


def nonfinite_tensors(tensors: list[dict[str, Any]]) -> Finding | None:
    if not tensors:
        return None
    named = ", ".join(
        f"{t['name']} ({t['nan']} NaN, {t['posinf']} +Inf, {t['neginf']} -Inf)" for t in tensors[:5]
    )
    more = f" and {len(tensors) - 5} more" if len(tensors) > 5 else ""
    return Finding(
        "checkpoint.nonfinite",
        "error",
        f"{len(tensors)} tensor(s) hold non-finite values: {named}{more}",
        "the run was already broken when this was saved: bisect to the first bad checkpoint "
        "(`energydiag bisect`) and replay from the last good one",
        {
            "tensors": [
                {k: t[k] for k in ("name", "nan", "posinf", "neginf", "first_nonfinite")}
                for t in tensors
            ]
        },
    )


def norm_outliers(outliers: list[dict[str, Any]]) -> Finding | None:
    if not outliers:
        return None
    worst = max(
        outliers, key=lambda o: abs(math.log(o["ratio"])) if 0 < o["ratio"] < math.inf else math.inf
    )
    return Finding(
        "checkpoint.norm_outlier",
        "warning",
        f"{worst['tensor']} has RMS {worst['rms']:.3g}, {worst['ratio']:.3g}× the median of its "
        f"{worst['role']} peers ({worst['peer_median_rms']:.3g})",
        "an exploding (or dead) layer: check its learning rate, initialisation and the gradients it "
        "receives (inspect the checkpoint on a batch)",
        {"outliers": outliers},
        [Invocation("inspect", "CKPT", {"batch": "BATCH"})],
    )


def adam_blowup_risk(rows: list[dict[str, Any]], limit: float) -> Finding | None:
    risky = [r for r in rows if r["elements_over_limit"]]
    if not risky:
        return None
    worst = max(risky, key=lambda r: r["max_ratio"])
    return Finding(
        "optimizer.adam_blowup_risk",
        "warning",
        f"Adam's |exp_avg| / (sqrt(exp_avg_sq) + eps) reaches {worst['max_ratio']:.3g} in "
        f"{worst['parameter']} (healthy: ≲ 10): second moments near zero next to large first moments",
        "the next update will be huge: raise eps, lower lr, or reset this parameter's optimizer state",
        {"parameters": risky},
    )


def beyond_autocast_range(tensors: list[dict[str, Any]], dtype: str | None) -> Finding | None:
    if not tensors:
        return None
    return Finding(
        "checkpoint.beyond_autocast_range",
        "error",
        f"{len(tensors)} tensor(s) hold values beyond the finite range of {dtype}, which this run "
        f"autocasts to: {', '.join(t['name'] for t in tensors[:5])}",
        f"these overflow to Inf the moment they are cast to {dtype}: keep them in float32 or rescale",
        {"tensors": [{"name": t["name"], "count": t["beyond_autocast_range"]} for t in tensors]},
    )


def checkpoint_exploded(layers: list[dict[str, Any]], limit: float) -> Finding | None:
    """Layers far beyond any sane initialisation while every value is still finite."""
    if not layers:
        return None
    worst = sorted(layers, key=lambda r: -r["max_abs"])
    named = ", ".join(f"{r['layer']} (max|w| {r['max_abs']:.3g})" for r in worst[:5])
    overflow = [r["layer"] for r in layers if r.get("square_overflows_fp32")]
    tail = (
        f"; {len(overflow)} of them square beyond float32, so any float32 norm, variance or "
        "softmax over them overflows"
        if overflow
        else ""
    )
    return Finding(
        "checkpoint.exploded",
        "error",
        f"{len(layers)} layer(s) hold finite values beyond {limit:g}, ×{worst[0]['max_abs'] / limit:.3g} "
        f"past a sane scale: {named}{tail}",
        "the weights blew up before anything went NaN: `energydiag timeline` finds the interval, "
        "then look at the lr schedule and gradient norms there",
        {"layers": worst, "limit": limit},
    )


def grown_since_first(history: dict[str, Any] | None, limit: float) -> Finding | None:
    if not history or history["growth"] < limit:
        return None
    return Finding(
        "checkpoint.grown",
        "error",
        f"layer {history['layer']} grew ×{history['growth']:.3g} since the run's first checkpoint",
        "the timeline shows when; a bisect on growth finds the step",
        history,
        [Invocation("timeline"), Invocation("bisect", options={"predicate": "exploded"})],
    )


def timeline_exploded(rows: list[dict[str, Any]], limit: float) -> Finding | None:
    if not rows:
        return None
    first = rows[0]
    return Finding(
        "timeline.exploded",
        "error",
        f"weights grew ×{first['growth_since_first']:.3g} since the first checkpoint by step "
        f"{first['step']} (layer {first['worst_layer']}: max|w| {first['max_abs']:.3g}); "
        f"{len(rows)} checkpoint(s) are past ×{limit:g}",
        f"a bisect on growth narrows it to the step; check the lr and gradient norms just before "
        f"step {first['step']}",
        {"first_step": first["step"], "rows": rows},
        [Invocation("bisect", options={"predicate": "exploded"})],
    )


def timeline_nonfinite(rows: list[dict[str, Any]]) -> Finding | None:
    if not rows:
        return None
    first = rows[0]
    return Finding(
        "timeline.nonfinite",
        "error",
        f"checkpoint {first['step']} holds {first['nonfinite']} non-finite value(s); "
        f"{len(rows)} checkpoint(s) do",
        f"a bisect finds the step that broke them, from the checkpoint before step {first['step']}",
        {"first_step": first["step"], "steps": [r["step"] for r in rows]},
        [Invocation("bisect", options={"predicate": "nonfinite"})],
    )


def unresolved_interval(unresolved: dict[str, Any] | None) -> Finding | None:
    if not unresolved:
        return None
    span = f"between checkpoints {unresolved['from']} and {unresolved['to']}"
    missing = unresolved["missing_batches"]
    if missing == "all":
        why = "there are no batches to replay it (checkpoints only)"
    elif missing:
        why = f"batches {missing} were not logged"
    else:
        why = "the replay cannot reach it"
    return Finding(
        "bisect.unresolved",
        "warning",
        f"the first bad step lies {span}, but {why}",
        unresolved["advice"],
        unresolved,
        [
            Invocation(
                "replay", options={"from_step": unresolved["from"], "to_step": unresolved["to"]}
            )
        ]
        if unresolved.get("ranks")
        else [],
    )


def non_monotone(warnings: list[str]) -> Finding | None:
    if not warnings:
        return None
    return Finding(
        "bisect.non_monotone",
        "warning",
        warnings[0],
        "the run recovered from a non-finite step (a skipped update?): the earliest failure is "
        "reported; look at every step the loop skipped",
        {"warnings": warnings},
    )


def log_before_checkpoints(notes: list[str]) -> Finding | None:
    """The log failed before any checkpoint shows it: an ordinary order of events (a NaN loss
    is logged before the next checkpoint is written), not a recovery."""
    if not notes:
        return None
    return Finding(
        "bisect.log_first",
        "info",
        notes[0],
        "nothing to repair in the search: the replay starts from the checkpoint before that step",
        {"notes": notes},
    )


def weights_broke_between(last_good: int | None, first_bad: int | None) -> Finding | None:
    if first_bad is None:
        return None
    after = (
        f"after checkpoint {last_good}" if last_good is not None else "from the first checkpoint"
    )
    return Finding(
        "run.weights_broke",
        "error",
        f"the weights exploded or went non-finite {after}, by checkpoint {first_bad}",
        f"`energydiag timeline` shows which layer; replay from checkpoint {last_good} with the "
        "batches of that interval (or record them with the Recorder) to find the step",
        {"last_good": last_good, "first_bad": first_bad},
    )


def eps_vanishes(eps: float | None, lost: list[str]) -> Finding | None:
    """Adam's eps, stored in a half-precision parameter dtype (``lost``: where it is 0), lets a
    parameter with exactly zero gradient divide 0 by 0."""
    if not lost:
        return None
    return Finding(
        "optimizer.eps_vanishes",
        "warning",
        f"the optimizer's eps {eps:g} is 0 in {', '.join(lost)}, the dtype of some parameters",
        "keep the optimizer state in float32 (master weights), or use an eps the dtype can hold "
        "(float16: >= 6e-8)",
        {"eps": eps, "dtypes": lost},
    )


def changed_outside_steps(outside: tuple[int, int] | None) -> Finding | None:
    """A replay from a good checkpoint stays healthy, while a later checkpoint is bad."""
    if outside is None:
        return None
    start, bad = outside
    return Finding(
        "bisect.changed_outside_steps",
        "warning",
        f"replaying from checkpoint {start} stays healthy, yet checkpoint {bad} is not: what broke "
        "it happened outside the recorded steps; the fault is localised from checkpoint "
        f"{bad} itself",
        "look for what changes the state between steps: weights or hyperparameters edited by "
        "hand, a second optimizer, a loaded checkpoint, state the run directory does not hold",
        {"healthy_from": start, "bad_checkpoint": bad},
    )


def growth_alarm(step: int | None, first_nonfinite: int | None, live: bool) -> Finding | None:
    """The live ``weight_growth`` rule over the checkpoints: where it would have fired.
    ``live``: the run was recorded with monitors, whose own alarms say more."""
    if step is None:
        return None
    remedy = (
        "the run's own alarms (alerts.jsonl) say when it fired live: diagnose scores them"
        if live
        else "record with the Recorder's monitors on (the default): it alarms on the step, with "
        "a forecast of the overflow, and on_alarm='dump' keeps the state there"
    )
    ahead = first_nonfinite is not None and step < first_nonfinite
    lead = f", before the first non-finite checkpoint at step {first_nonfinite}" if ahead else ""
    return Finding(
        "timeline.would_alarm",
        "warning",
        f"the live weight_growth monitor would have alarmed by checkpoint {step}{lead}: max|w| "
        "grew ≥ ×1.05 per step since the checkpoint before, to ≥ 4× its first value",
        remedy,
        {"step": step, "first_nonfinite": first_nonfinite},
    )
