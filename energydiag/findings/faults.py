"""A localised non-finite fault in words: the pattern its op and evidence show, and the remedy."""

from __future__ import annotations

from typing import Any

from energydiag.findings.base import Finding


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


def _variance_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    return (
        f"its inputs reach {d['largest_input']:.3g}, every one finite, but their squares overflow "
        f"{d['dtype']} above {d['variance_limit']:.3g}: the variance is Inf and normalising "
        "gives NaN",
        f"the values feeding '{fault.module or name}' exploded while still finite: find the "
        "step they grew (`energydiag bisect` names it, `energydiag timeline` shows the layer) "
        "and the lr or gradient event behind it",
    )


def _sqrt_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    what = "0" if d.get("zero_inputs") else "a negative value"
    return (
        f"{name} at {what} (first at index {d.get('first_bad_index')})",
        "the derivative of sqrt at 0 is infinite: add eps inside the sqrt (sqrt(x + eps))",
    )


def _div_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    said = f"division by zero ({d['zero_denominators']} zero denominator(s))"
    if fault.phase == "optimizer":
        eps = {s.get("eps") for s in fault.optimizer_state.values()}
        return (
            f"{said} in the update: Adam divides by sqrt(exp_avg_sq) + eps, with eps {eps}",
            "a parameter whose gradient is exactly zero gets 0/0 when eps is 0: keep eps >= 1e-8 "
            "(and find the input feature or path that feeds it nothing)",
        )
    return said, "add eps to the denominator or guard it"


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
    (
        lambda name, d: d.get("largest_input", 0) > d.get("variance_limit", float("inf")),
        _variance_cause,
    ),
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
    return None, "re-run the step in a replay: its JSON report holds every module's statistics"
