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
    bounds: tuple[float, float] | None,
    tau: float | None,
    batch_size: int,
    b: dict[str, float] | None,
) -> Finding | None:
    """``b``: the InfoNCE bounds the head's span allows, computed by the caller."""
    if bounds is None or tau is None or b is None or math.isinf(bounds[1] - bounds[0]):
        return None
    span = bounds[1] - bounds[0]
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


# --- non-finite values -------------------------------------------------------------------------


def explain_fault(fault: Any) -> Finding:
    """A localised fault (energydiag.engine.localise.Fault) with the remedy for its cause."""
    evidence = {k: v for k, v in fault.to_dict().items() if v not in (None, [], {})}
    micro = fault.micro_batch
    where = f" (micro-batch {micro})" if micro and micro > 1 else ""
    title = f"step {fault.step}, {fault.phase}{where}: {fault.summary}"
    cause, remedy = root_cause(fault)
    if cause:
        title += f" — {cause}"
    return Finding(f"nonfinite.{fault.phase}", "error", title, remedy, evidence)


def root_cause(fault: Any) -> tuple[str | None, str]:
    """Words for the pattern the evidence shows, most specific first."""
    op = fault.op
    name, detail = (op.op, op.detail) if op else ("", {})
    if fault.all_masked_samples and (fault.exception or name.endswith("softmax")):
        return (
            f"sample(s) {fault.all_masked_samples} have a pad_mask row masking every key",
            "attention normalises over nothing: drop or repair those samples, or unmask one "
            "key per row",
        )
    if fault.masked_by_where and op is not None:
        return (
            f"torch.where gradient trap: {name} produced {op.gained} in the branch where() "
            "discarded, and its gradient is NaN",
            f"make the input of {name} safe where it is not used (e.g. where(mask, x, 1) inside "
            "the op) instead of masking its output",
        )
    for applies, explain in _CAUSES:
        if applies(name, detail):
            return explain(name, detail, fault)
    return _phase_cause(fault)


def _spread_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    return (
        f"{name} over {d['elements_reduced']} element(s) with correction {d['correction']}: "
        "zero degrees of freedom",
        "a std/var of a single value (e.g. E_pos.std() after .mean()) is NaN: take it over the "
        "batch, or use correction=0",
    )


def _log_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    what = "0" if d.get("zero_inputs") else "a negative value"
    return (
        f"{name} of {what} ({d.get('zero_inputs', 0)} zero, {d.get('negative_inputs', 0)} "
        f"negative input(s), first at index {d.get('first_bad_index')})",
        "an energy or probability reached 0: clamp_min(eps) before the log, or compute in log "
        "space",
    )


def _cast_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    return (
        f"a value of {d['largest_input']:.3g} exceeds {d['to_dtype']}'s largest finite "
        f"{d['dtype_max']:.6g} when cast in '{fault.module or '<loss>'}'",
        f"keep this module in float32 under autocast, or rescale its inputs below "
        f"{d['dtype_max']:.6g}",
    )


def _norm_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    top = next(iter(fault.largest.items()), None)
    who = f"; the largest contribution is '{top[0]}' (|g| {top[1]:.3g})" if top else ""
    return (
        f"the norm's squares overflow float32 (values above {d['square_limit']:.3g}){who}",
        "the gradients exploded before clipping could help: lower lr, look at that layer, and "
        "`energydiag timeline` for when its weights grew",
    )


def _sqrt_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    what = "0" if d.get("zero_inputs") else "a negative value"
    return (
        f"{name} at {what} (first at index {d.get('first_bad_index')})",
        "the derivative of sqrt at 0 is infinite: add eps inside the sqrt (sqrt(x + eps))",
    )


def _div_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    return (
        f"division by zero ({d['zero_denominators']} zero denominator(s))",
        "add eps to the denominator or guard it",
    )


def _overflow_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    return (
        f"{name} overflowed: inputs up to {d['largest_input']:.3g} against a dtype maximum "
        f"of {d['dtype_max']:.3g}",
        "the values feeding it exploded earlier: `energydiag timeline` shows the layer and "
        "the step where the weights grew",
    )


def _no_dof(name: str, d: dict[str, Any]) -> bool:
    return "elements_reduced" in d and d["elements_reduced"] - d["correction"] <= 0


def _log_of_nonpositive(name: str, d: dict[str, Any]) -> bool:
    return name.startswith("aten::log") and bool(d.get("zero_inputs") or d.get("negative_inputs"))


def _narrowing_cast(name: str, d: dict[str, Any]) -> bool:
    return "to_dtype" in d and bool(d.get("dtype_max")) and d["largest_input"] > d["dtype_max"]


_CAUSES = [
    (_no_dof, _spread_cause),
    (_log_of_nonpositive, _log_cause),
    (_narrowing_cast, _cast_cause),
    (lambda name, d: "square_limit" in d, _norm_cause),
    (lambda name, d: name in ("aten::sqrt", "aten::rsqrt"), _sqrt_cause),
    (lambda name, d: bool(d.get("zero_denominators")), _div_cause),
    (lambda name, d: "dtype_max" in d and "to_dtype" not in d, _overflow_cause),
]


def _phase_cause(fault: Any) -> tuple[str | None, str]:
    if fault.exception:
        return None, (
            "the model or loss raised: its message is in the evidence, with the op whose "
            "non-finite output it caught when there was one"
        )
    if fault.phase == "data":
        return None, (
            f"the input '{fault.tensor}' was already non-finite: fix the data pipeline "
            f"(sample {fault.sample})"
        )
    if fault.phase == "state":
        return None, "the checkpoint was already broken: bisect to the first bad checkpoint"
    if fault.phase == "optimizer":
        return None, (
            "the update itself blew the weights up: check the step's lr (a schedule jump?), eps "
            "(Adam divides by sqrt(exp_avg_sq) + eps) and parameters that receive zero gradient"
        )
    if fault.op is not None:
        return None, f"guard the inputs of {fault.op.op} (their ranges are in the evidence)"
    return None, "re-run the step with `energydiag replay --json` for every module's statistics"


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
    finite = [r for r in results if r["finite"] and r["relative_drop"] is not None]
    best = max(finite, key=lambda r: r["relative_drop"], default=None)
    if best is None or not base["finite"]:
        return None
    if best["label"] == "baseline" or best["relative_drop"] <= base["relative_drop"]:
        return Finding(
            "whatif.none_better",
            "info",
            "no finite variant beats the baseline over this window",
            "try a longer window (--steps) or other variants",
            {"baseline": base["label"], "baseline_drop": base["relative_drop"]},
        )
    return Finding(
        "whatif.best",
        "info",
        f"'{best['label']}' lowers the loss by {best['relative_drop']:.1%} over the window; the "
        f"baseline moves {base['relative_drop']:.1%}",
        f"apply '{best['label']}' to the training configuration and confirm on a longer run",
        {
            "best": best["label"],
            "baseline_drop": base["relative_drop"],
            "best_drop": best["relative_drop"],
        },
    )


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


# --- precursors: finite but exploded -----------------------------------------------------------


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
        f"`energydiag bisect --predicate exploded` narrows it to the step; check the lr and "
        f"gradient norms just before step {first['step']}",
        {"first_step": first["step"], "rows": rows},
    )


def grown_since_first(history: dict[str, Any] | None, limit: float) -> Finding | None:
    if not history or history["growth"] < limit:
        return None
    return Finding(
        "checkpoint.grown",
        "error",
        f"layer {history['layer']} grew ×{history['growth']:.3g} since the run's first checkpoint",
        "`energydiag timeline RUN` shows when; `energydiag bisect --predicate exploded` finds the step",
        history,
    )


# --- contrastive health ------------------------------------------------------------------------


def contrastive_health(
    energy: dict[str, float], batch_size: int, candidates: int, loss: str, margin: float | None
) -> Finding | None:
    """Retrieval at or below chance, or positives scored *above* their negatives: by more than
    two standard errors of the paired per-row gap, or at all while retrieval is at or below
    chance (two signals agreeing). An untrained head's noise is no verdict."""
    chance = 1.0 / candidates
    accuracy, gap = energy["retrieval_accuracy"], energy["pos_neg_gap"]
    error = energy["pos_neg_gap_row_std"] / math.sqrt(batch_size)
    sign = gap < -2 * error or (gap < 0 and accuracy <= chance)
    if not sign and accuracy > chance:
        return None
    remedy = (
        "low energy means good: a hinge must be relu(margin + E_pos - E_neg); the seed report's "
        "relu(E_neg - E_pos + margin) pushes positives up"
        if margin is not None and sign
        else "check the sign convention (logits = -E / tau) and that positives and negatives are "
        "not swapped; an untrained head ranks at chance"
    )
    said = (
        f"positives score higher energy than negatives (gap neg - pos = {gap:.3g})"
        if sign
        else f"retrieval accuracy {accuracy:.3g} is at or below chance 1/{candidates}"
    )
    return Finding(
        "contrastive.wrong_sign" if sign else "contrastive.at_chance",
        "error",
        f"{said} under loss {loss}",
        remedy,
        {
            "retrieval_accuracy": accuracy,
            "chance": chance,
            "pos_neg_gap": gap,
            "gap_standard_error": error,
            "margin": margin,
        },
    )


def stuck_between_floor_and_chance(
    position: float | None, energy: dict[str, float], tau: float | None
) -> Finding | None:
    """A loss above its floor whose logits cannot spread enough to go lower."""
    spread = energy.get("logit_spread_row_mean")
    if position is None or spread is None or position < 0.1 or spread >= 1.0:
        return None
    return Finding(
        "loss.stuck",
        "error",
        f"the loss sits {position:.0%} of the way from its floor to chance with a logit spread of "
        f"only {spread:.3g} per row at tau {tau:g}: too small a range to learn from",
        "widen the energy range (softplus or unbounded head) or lower tau",
        {"position": position, "logit_spread_row_mean": spread, "tau": tau},
    )


def dead_gradients(grad_norms: dict[str, float], step: int) -> Finding | None:
    dead = [layer for layer, norm in grad_norms.items() if norm == 0.0]
    if not dead or len(dead) == len(grad_norms):
        return None
    return Finding(
        "gradient.dead",
        "warning",
        f"{len(dead)} layer(s) receive exactly zero gradient at step {step}: {', '.join(dead[:5])}",
        "a dead path: a saturated or collapsed op upstream, a detached tensor, or a ReLU that "
        "never fires; the saturation table shows which",
        {"layers": dead, "step": step},
    )


def has_code(findings: list[Finding], code: str) -> bool:
    return any(f.code == code for f in findings)


# --- what could not be checked -----------------------------------------------------------------


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
        "record with energydiag.Recorder(persist_batches=True), or `energydiag convert --batch` "
        "the batches you have; until then only checkpoints and curves are judged",
        {"checkpoints": len(checkpoints)},
    )


def precision_verdict(ladder: dict[str, Any]) -> Finding | None:
    verdict, rungs = ladder["verdict"], ladder["rungs"]
    said = ", ".join(f"{r['precision']}: {r['status']}" for r in rungs)
    if verdict == "precision":
        clean = next(r["precision"] for r in rungs if r["status"] == "finite")
        return Finding(
            "precision.fault",
            "error",
            f"step {ladder['step']} is a precision fault: it disappears in {clean} ({said})",
            "keep the failing module in float32 under autocast (or use bfloat16, whose range is "
            "float32's), and check that eps values are above the dtype's resolution",
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
    return None


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
        "layer whose values exceed float16 (`energydiag replay --ladder`)"
        if collapsing
        else "skipped steps are how a GradScaler finds its scale; nothing to fix unless they persist",
        {"steps": rows},
    )
