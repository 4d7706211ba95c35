"""A localised non-finite fault in words: the pattern its op and evidence show, and the remedy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from energydiag.findings.base import Finding

Account = Callable[[str, dict[str, Any], Any], tuple[str, str]]
# One account per cause an op's evidence names (engine.observers.explains(..., causes=...)).
CAUSES: dict[str, Account] = {}


def accounts(kind: str) -> Callable[[Account], Account]:
    def register(fn: Account) -> Account:
        if kind in CAUSES:
            raise ValueError(f"cause {kind!r} already has an account: {CAUSES[kind].__name__}")
        CAUSES[kind] = fn
        return fn

    return register


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
    account = CAUSES.get(detail.get("cause", ""))
    return account(name, detail, fault) if account else _phase_cause(fault)


@accounts("no_degrees_of_freedom")
def _spread_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    return (
        f"{name} over {d['elements_reduced']} element(s) with correction {d['correction']}: "
        "zero degrees of freedom",
        "a std/var of a single value (e.g. E_pos.std() after .mean()) is NaN: take it over the "
        "batch, or use correction=0",
    )


@accounts("log_of_nonpositive")
def _log_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    what = "0" if d.get("zero_inputs") else "a negative value"
    return (
        f"{name} of {what} ({d.get('zero_inputs', 0)} zero, {d.get('negative_inputs', 0)} "
        f"negative input(s), first at index {d.get('first_bad_index')})",
        "an energy or probability reached 0: clamp_min(eps) before the log, or compute in log "
        "space",
    )


@accounts("narrowing_cast")
def _cast_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    return (
        f"a value of {d['largest_input']:.3g} exceeds {d['to_dtype']}'s largest finite "
        f"{d['dtype_max']:.6g} when cast in '{fault.module or '<loss>'}'",
        f"keep this module in float32 under autocast, or rescale its inputs below "
        f"{d['dtype_max']:.6g}",
    )


@accounts("norm_overflow")
def _norm_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    top = next(iter(fault.largest.items()), None)
    who = f"; the largest contribution is '{top[0]}' (|g| {top[1]:.3g})" if top else ""
    return (
        f"the norm's squares overflow float32 (values above {d['square_limit']:.3g}){who}",
        "the gradients exploded before clipping could help: lower lr, look at that layer, and "
        "`energydiag timeline` for when its weights grew",
    )


@accounts("variance_overflow")
def _variance_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    return (
        f"its inputs reach {d['largest_input']:.3g}, every one finite, but their squares overflow "
        f"{d['dtype']} above {d['variance_limit']:.3g}: the variance is Inf and normalising "
        "gives NaN",
        f"the values feeding '{fault.module or name}' exploded while still finite: find the "
        "step they grew (`energydiag bisect` names it, `energydiag timeline` shows the layer) "
        "and the lr or gradient event behind it",
    )


@accounts("sqrt")
def _sqrt_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    what = "0" if d.get("zero_inputs") else "a negative value"
    return (
        f"{name} at {what} (first at index {d.get('first_bad_index')})",
        "the derivative of sqrt at 0 is infinite: add eps inside the sqrt (sqrt(x + eps))",
    )


@accounts("zero_denominator")
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


@accounts("overflow")
def _overflow_cause(name: str, d: dict[str, Any], fault: Any) -> tuple[str, str]:
    return (
        f"{name} overflowed: inputs up to {d['largest_input']:.3g} against a dtype maximum "
        f"of {d['dtype_max']:.3g}",
        "the values feeding it exploded earlier: `energydiag timeline` shows the layer and "
        "the step where the weights grew",
    )


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
