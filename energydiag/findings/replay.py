"""Rules about a replay: how faithful it was, what it could not see, the schedule, loss scaling,
the precision ladder, and what could not be replayed at all.
"""

from __future__ import annotations

import math
from typing import Any

from energydiag.findings.base import Finding, Invocation


def fidelity(fid: dict[str, Any], tolerance: float) -> Finding | None:
    """What a replay's agreement with the log shows, and no more."""
    lacking = "; ".join(fid["missing"] + fid["environment"])
    if fid["compared"] == 0:
        if not fid["nonfinite_on_both"] and not fid["mismatched"]:
            return None
        return Finding(
            "replay.unverified",
            "warning",
            "fidelity unknown: no finite logged loss to compare with "
            f"({fid['nonfinite_on_both']} step(s) non-finite in both, {fid['mismatched']} in one)",
            "start the replay from an earlier checkpoint so some healthy steps are compared",
            fid,
        )
    if fid["bit_exact"]:
        return None
    dev, rel = fid["max_loss_deviation"], fid["max_relative_deviation"]
    params = fid["max_parameter_deviation"]
    said = (
        f"replayed losses differ from the logged ones by up to {dev:.3g} "
        f"over {fid['compared']} step(s)"
    )
    if params is not None:
        said += f"; parameters by up to {params:.3g} at the next checkpoint"
    if fid["expected"] == "bit-exact" or fid["mismatched"]:
        return Finding(
            "replay.diverges",
            "warning",
            said,
            "nothing the replay knows of differs from the recording: check the manifest (loss "
            "kwargs, clip, optimizer, step function) and non-deterministic kernels",
            fid,
        )
    close = rel is not None and rel <= tolerance
    return Finding(
        "replay.approximate",
        "info" if close else "warning",
        f"{said}: bit-for-bit agreement is not expected here ({lacking})",
        "record with energydiag.Recorder on the machine you replay on for an exact replay"
        if close
        else "the missing inputs are large enough to change the trajectory: treat this "
        "replay as a similar run, not the recorded one",
        fid,
    )


def unseen_event(step: int | None, fid: dict[str, Any]) -> Finding | None:
    if step is None:
        return None
    return Finding(
        "replay.unseen_event",
        "error",
        f"the log says step {step} went non-finite, but the replay computed it finite: the log "
        "records an event the replay cannot see",
        "something changed that the run directory does not hold: an lr or other hyperparameter "
        "between checkpoints, optimizer state, or the data; record per-step hyperparameters "
        "(energydiag.Recorder does) and the optimizer state",
        {"step": step, "missing": fid["missing"], "environment": fid["environment"]},
    )


def schedule_jumps(found: list[dict[str, Any]]) -> Finding | None:
    if not found:
        return None
    worst = max(found, key=lambda j: j["factor"] if math.isfinite(j["factor"]) else math.inf)
    return Finding(
        "schedule.jump",
        "error",
        f"{worst['key']} jumped ×{worst['factor']:.3g} at step {worst['step']} (group "
        f"{worst['group']}: {worst['before']:.3g} -> {worst['after']:.3g} since step "
        f"{worst['previous_step']})",
        "look at the scheduler: a warm-up dividing by zero steps, a scheduler stepped per "
        "micro-batch, or a manual param_group edit; cap the lr",
        {"jumps": found},
    )


def skipped_steps(rows: list[dict[str, Any]]) -> Finding | None:
    """Steps a GradScaler skipped: expected now and then; a scale that keeps falling is not."""
    if not rows:
        return None
    last = rows[-1]["scale"]
    collapsing = last < 1.0
    return Finding(
        "amp.skipped_steps",
        "error" if collapsing else "info",
        f"the GradScaler skipped {len(rows)} step(s) with overflowing gradients "
        f"({', '.join(str(r['step']) for r in rows[:8])}); the scale before the last was {last:g}",
        "the scale is collapsing: the gradients overflow float16 at any scale, so look for the "
        "layer whose values exceed float16 (the precision ladder re-runs the step)"
        if collapsing
        else "skipped steps are how a GradScaler finds its scale; nothing to fix unless they persist",
        {"steps": rows},
        [Invocation("replay", options={"ladder": True})] if collapsing else [],
    )


def never_updated(rows: list[dict[str, Any]], logged: int) -> Finding | None:
    """A GradScaler run whose every logged step was skipped (its gradient norm non-finite, its
    loss finite): the scaler never found a scale, and the weights never moved."""
    if not rows or len(rows) < logged:
        return None
    scales = [r["scale"] for r in rows if r.get("scale") is not None]
    tried = f", at scales {scales[0]:g} down to {scales[-1]:g}" if scales else ""
    searching = bool(scales) and scales[-1] >= 1.0  # the scale could still fall and fit
    return Finding(
        "amp.never_updated",
        "error",
        f"the GradScaler skipped all {logged} logged steps (gradients overflowed{tried}): "
        "the weights never moved",
        "the run ended while the scale was still halving towards one that fits float16: start "
        "from a lower init_scale"
        if searching
        else "find the layer whose gradients overflow float16 (the precision ladder re-runs a "
        "step)",
        {"steps": rows, "logged": logged},
        [] if searching else [Invocation("replay", options={"ladder": True})],
    )


def precision_verdict(ladder: dict[str, Any]) -> Finding | None:
    """``ladder``: the rungs, the verdict and the run's ``autocast_dtype``; the remedy follows
    from the precision the run actually used, not from a template about autocast."""
    verdict, rungs = ladder["verdict"], ladder["rungs"]
    said = ", ".join(f"{r['precision']}: {r['status']}" for r in rungs)
    if verdict == "precision":
        clean = next(r["precision"] for r in rungs if r["status"] == "finite")
        if ladder.get("autocast_dtype"):
            remedy = (
                f"keep the failing module in float32 under {ladder['autocast_dtype']} autocast "
                "(or use bfloat16, whose range is float32's), and check that eps values are above "
                "the dtype's resolution"
            )
        else:
            remedy = (
                f"the run computes in its own precision (no autocast) and only {clean} survives: "
                "the values exceed what that precision holds; find why they grew (`energydiag "
                "timeline`) rather than raising the precision"
            )
        return Finding(
            "precision.fault",
            "error",
            f"step {ladder['step']} is a precision fault: it disappears in {clean} ({said})",
            remedy,
            ladder,
        )
    if verdict == "maths":
        return Finding(
            "precision.maths",
            "error",
            f"step {ladder['step']} fails in every precision ({said}): the fault is in the maths",
            "no dtype fixes it: guard the op the fault names (its root cause is above)",
            ladder,
        )
    if verdict == "undecided":
        return Finding(
            "precision.undecided",
            "warning",
            f"step {ladder['step']} fails in every precision that could run ({said}); float64 "
            "could not, so precision is not ruled out",
            "the model casts inside its forward: run the failing op in float64 by hand to decide",
            ladder,
        )
    return None


def cannot_replay(step: int, reason: str) -> Finding:
    return Finding(
        "run.cannot_replay",
        "error",
        f"the run fails at step {step}, but that step cannot be replayed: {reason}",
        "keep the batches before a failure: energydiag.Recorder(keep_batches=...) dumps the ring "
        "on the first non-finite value or exception",
        {"step": step, "reason": reason},
    )


def no_batches(checkpoints: list[int]) -> Finding:
    return Finding(
        "run.no_batches",
        "warning",
        "cannot check the steps: no batches logged"
        + (" at any checkpoint's step" if checkpoints else ""),
        "record with energydiag.Recorder(persist_batches=True), or convert the batches you have "
        "into a run; until then only checkpoints and curves are judged",
        {"checkpoints": len(checkpoints)},
        [Invocation("convert", "DIR", {"batch": "STEP=FILE"})],
    )
