"""What is wrong, with its evidence and the remedy that fits: one place for every rule.

Analyses compute numbers; the rules here turn them into findings. Renderers only display them.
Each rule is a small function returning a Finding or None, so adding one is adding a function.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    code: str
    severity: str
    title: str
    remedy: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ranked(findings: list[Finding | None]) -> list[Finding]:
    """Drop the Nones; errors first, then warnings, then notes, each in the order found."""
    kept = [f for f in findings if f is not None]
    return sorted(kept, key=lambda f: SEVERITIES.index(f.severity))


def has_error(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


# --- energy range, temperature and loss bounds -------------------------------------------------


def narrow_energy_range(stats: dict[str, float], tau: float | None) -> Finding | None:
    span = stats["energy_max"] - stats["energy_min"]
    if tau is None or span / tau >= 1.0:
        return None
    return Finding(
        "energy.narrow_range",
        "error" if span / tau < 0.1 else "warning",
        f"energies span only {span:.3g} at tau {tau:g}: logits differ by at most {span / tau:.3g}",
        "widen the energy range (softplus or unbounded head, or a wider scaled sigmoid) or lower "
        "tau; raising tau, often proposed, divides the spread further",
        {"energy_span": span, "tau": tau, "logit_spread": span / tau},
    )


def loss_position(loss: float, bounds: dict[str, float], batch_size: int) -> Finding | None:
    """Where a loss sits between the floor the head allows and chance (log B)."""
    floor, chance = bounds["floor"], bounds["chance"]
    if not math.isfinite(loss) or chance - floor <= 0:
        return None
    position = (loss - floor) / (chance - floor)
    evidence = {
        "loss": loss,
        "floor": floor,
        "chance": chance,
        "position": position,
        "batch_size": batch_size,
    }
    if abs(loss - chance) < 0.02 * chance:
        return Finding(
            "loss.at_chance",
            "error",
            f"loss {loss:.4f} sits at chance log({batch_size}) = {chance:.4f}: the model does not "
            "tell its positive from the in-batch negatives",
            "look for a saturated or constant energy head (no gradient reaches the body), a dead "
            "graph, or contexts that carry no information about the action",
            evidence,
        )
    if position < 0.1:
        return Finding(
            "loss.at_floor",
            "warning",
            f"loss {loss:.4f} is within 10% of the floor {floor:.4f} that the energy bound and tau "
            "allow: it cannot go lower however well the model ranks",
            "the plateau is the bound, not a training failure: widen the energy range or lower tau",
            evidence,
        )
    return None


def bounded_head_floor(
    bounds: tuple[float, float] | None, tau: float | None, batch_size: int
) -> Finding | None:
    if bounds is None or tau is None or math.isinf(bounds[1] - bounds[0]):
        return None
    from energydiag.losses import infonce_bounds

    span = bounds[1] - bounds[0]
    b = infonce_bounds(batch_size, tau, span)
    return Finding(
        "head.bounded_floor",
        "warning" if b["floor"] > 0.1 * b["chance"] else "info",
        f"the energy head is bounded to a span of {span:.3g}: at tau {tau:g} and B {batch_size} the "
        f"InfoNCE loss cannot fall below {b['floor']:.4f} (chance is {b['chance']:.4f})",
        "use a softplus/unbounded head or a wider scaled sigmoid; raising tau raises this floor",
        {"head_span": span, "tau": tau, "batch_size": batch_size, **b},
    )


def saturation(fractions: list[dict[str, Any]], threshold: float = 0.5) -> Finding | None:
    worst = max(fractions, key=lambda s: s["fraction"], default=None)
    if worst is None or worst["fraction"] < threshold:
        return None
    return Finding(
        "activation.saturated",
        "error" if worst["fraction"] > 0.9 else "warning",
        f"{worst['fraction']:.0%} of {worst['op']} outputs in '{worst['module']}' are within 1e-3 "
        "of their limits: the local gradient there has all but vanished",
        "remove the squashing output (softplus/identity head), re-centre its input (bias, "
        "normalisation) or lower the learning rate that drove it there",
        {"saturation": fractions},
    )


def all_masked_rows(rows: list[int], source: str) -> Finding | None:
    if not rows:
        return None
    return Finding(
        "data.all_masked_row",
        "error",
        f"pad_mask in {source} masks every key for sample(s) {rows}: attention over them is NaN",
        "drop such samples in the data pipeline, or keep at least one key unmasked per row",
        {"samples": rows},
    )


def fidelity(max_deviation: float | None, compared: int) -> Finding | None:
    if max_deviation is None or max_deviation == 0.0:
        return None
    return Finding(
        "replay.diverges",
        "warning",
        f"replayed losses differ from the logged ones by up to {max_deviation:.3g} over {compared} step(s)",
        "on CPU in float32 a recorded run replays bit for bit: check the manifest (loss kwargs, "
        "clip, optimizer), non-deterministic kernels, or a run recorded on another device",
        {"max_deviation": max_deviation, "compared": compared},
    )


# --- non-finite values -------------------------------------------------------------------------


def explain_fault(fault: Any) -> Finding:
    """A localised fault (energydiag.localise.Fault) as a finding with the remedy for its cause."""
    evidence = {k: v for k, v in fault.to_dict().items() if v not in (None, [], {})}
    title = f"step {fault.step}, {fault.phase}: {fault.summary}"
    return Finding(f"nonfinite.{fault.phase}", "error", title, _fault_remedy(fault), evidence)


def _fault_remedy(fault: Any) -> str:
    op = fault.op
    if fault.all_masked_samples and (fault.exception or (op and op.op.endswith("softmax"))):
        return (
            f"sample(s) {fault.all_masked_samples} have a pad_mask row that masks every key, so "
            "attention normalises over nothing; drop or repair those samples, or unmask one key "
            "per row"
        )
    if fault.exception:
        return "the model or loss raised: read its message; replay the step with the guard off to see the raw values"
    if fault.phase == "data":
        return f"the input '{fault.tensor}' was already non-finite: fix the data pipeline (sample {fault.sample})"
    if fault.phase == "optimizer":
        return (
            "finite gradients produced a non-finite update: check lr, eps (Adam divides by "
            "sqrt(exp_avg_sq) + eps) and parameters that receive zero gradient; lower lr or raise eps"
        )
    if fault.phase == "clip":
        return (
            "the gradient norm itself overflowed: clip per parameter first, or scale the loss down"
        )
    if op is not None:
        return _OP_REMEDIES.get(
            op.op, f"guard the input of {op.op} (its input ranges are in the evidence)"
        )
    return "re-run the step with `energydiag replay --json` to see every module's output statistics"


_OP_REMEDIES = {
    "aten::_softmax": "a softmax row was entirely -inf (every entry masked): keep one entry per row",
    "aten::_log_softmax": "a log-softmax row was entirely -inf: keep one entry per row",
    "aten::log": "log of a value <= 0: add a floor (clamp_min) or work in log space",
    "aten::sqrt": "sqrt of a negative value (or its gradient at 0): clamp the input or add eps",
    "aten::div": "division by zero: add eps to the denominator",
    "aten::exp": "exp overflowed: subtract the max first, or clamp the exponent",
}


# --- checkpoint contents -----------------------------------------------------------------------


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
        "receives (`energydiag inspect --batch`)",
        {"outliers": outliers},
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


# --- bisect ------------------------------------------------------------------------------------


def unresolved_interval(unresolved: dict[str, Any] | None) -> Finding | None:
    if not unresolved:
        return None
    span = f"between checkpoints {unresolved['from']} and {unresolved['to']}"
    return Finding(
        "bisect.unresolved",
        "warning",
        f"the first bad step lies {span}, but batches {unresolved['missing_batches']} were not logged",
        unresolved["advice"],
        unresolved,
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


# --- metric curves -----------------------------------------------------------------------------


def curve_nonfinite(step: int | None, metric: str) -> Finding | None:
    if step is None:
        return None
    return Finding(
        "curve.nonfinite",
        "error",
        f"'{metric}' is first non-finite at step {step}",
        f"bisect or replay from the checkpoint before step {step}: "
        f"`energydiag replay RUN --from-step {step}`",
        {"step": step},
    )


def curve_plateau(
    plateaus: list, on: str | None, bounds: dict[str, float] | None, metric: str
) -> Finding | None:
    if not plateaus:
        return None
    p = plateaus[-1]
    evidence = {"plateaus": [asdict(s) for s in plateaus], "bounds": bounds, "sits_on": on}
    where = f"steps {p.start}–{p.end} at {p.level:.4g}"
    if on == "chance":
        return Finding(
            "curve.plateau_at_chance",
            "error",
            f"'{metric}' is flat over {where}: chance level log({bounds['batch_size']}) = "
            f"{bounds['chance']:.4g}, the model does not discriminate at all",
            "no useful gradient reaches the model: inspect a checkpoint from the plateau for a "
            "saturated head or collapsed energies (`energydiag inspect`)",
            evidence,
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
        "compare with the bounds (`--batch-size`, `--tau`, `--energy-span`) and inspect a "
        "checkpoint from the plateau",
        evidence,
    )


def curve_constant(segments: list, metric: str) -> Finding | None:
    if not segments:
        return None
    s = max(segments, key=lambda x: x.length)
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
        "replay the spiking steps (`--from-step`) and look at their batches",
        {"spikes": spikes},
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


# --- what-if -----------------------------------------------------------------------------------


def whatif_ranking(results: list[dict[str, Any]]) -> Finding | None:
    base = next(r for r in results if r["label"] == "baseline")
    best = min(results, key=lambda r: r["rank"])
    if best["label"] == "baseline" or best["relative_drop"] <= base["relative_drop"]:
        return Finding(
            "whatif.none_better",
            "info",
            "no variant beats the baseline over this window",
            "try a longer window (--steps) or other variants",
            {"baseline": base},
        )
    return Finding(
        "whatif.best",
        "info",
        f"'{best['label']}' lowers the loss by {best['relative_drop']:.1%} over the window; the baseline "
        f"moves {base['relative_drop']:.1%}",
        f"apply '{best['label']}' to the training configuration and confirm on a longer run",
        {
            "best": best["label"],
            "baseline_drop": base["relative_drop"],
            "best_drop": best["relative_drop"],
        },
    )


# --- set-ups seen in real runs -----------------------------------------------------------------


def model_raised(step: int, message: str) -> Finding:
    return Finding(
        "model.raised",
        "error",
        f"the model or loss raised on the batch of step {step}: {message}",
        "the model guards itself (non-finite tensor, all-masked row): `energydiag replay` on the "
        "step localises what tripped the guard",
        {"step": step, "exception": message},
    )


def unreachable_margin(margin: float | None, bounds: tuple[float, float] | None) -> Finding | None:
    if margin is None or bounds is None or margin < bounds[1] - bounds[0]:
        return None
    span = bounds[1] - bounds[0]
    return Finding(
        "head.unreachable_margin",
        "error",
        f"the hinge margin {margin:g} is at least the whole energy range the head allows "
        f"({bounds[0]:.3g}..{bounds[1]:.3g}, span {span:.3g}): no pair can satisfy it",
        "use a margin well below the span, or a wider/unbounded energy head",
        {"margin": margin, "head_bounds": list(bounds)},
    )


def coarse_inputs(half: dict[str, str], energy: dict[str, float]) -> Finding | None:
    """bfloat16 keeps 8 significant bits: relative steps of 2^-8 (about 0.4%)."""
    if not half:
        return None
    gap, scale = abs(energy["pos_neg_gap"]), max(abs(energy["energy_mean"]), 1e-12)
    resolution = 2.0**-8 if "bfloat16" in half.values() else 2.0**-11
    if gap / scale >= resolution:
        return None
    return Finding(
        "data.coarse_inputs",
        "warning",
        f"inputs {', '.join(f'{k} ({v})' for k, v in half.items())} resolve relative differences of "
        f"~{resolution:.2g}, coarser than the relative energy gap {gap / scale:.2g} the loss must learn",
        "cast the policy's hidden states to float32 before detaching them for the energy model, "
        "or widen the energy range",
        {"inputs": half, "relative_gap": gap / scale, "resolution": resolution},
    )
