"""What the live monitors said while the run trained, and whether their forecast came true."""

from __future__ import annotations

from typing import Any

from energydiag.findings.base import Finding, Invocation

FACTOR = 2.0  # a forecast within this factor of the truth held


def recorded_alarms(
    alarms: list[dict[str, Any]], first_nonfinite: int | None, last_step: int | None
) -> Finding | None:
    """The run's alarms (``alerts.jsonl``) against what happened after them: the lead they had
    over the first non-finite value, and the first forecast scored against the steps it took."""
    if not alarms:
        return None
    first: dict[str, int] = {}
    for alarm in alarms:
        first.setdefault(alarm["rule"], alarm["step"])
    order = sorted(first.items(), key=lambda item: item[1])
    (rule, step), later = order[0], order[1:]
    ahead = first_nonfinite is not None and step < first_nonfinite
    lead = (
        f", {first_nonfinite - step} steps before the first non-finite value at step "
        f"{first_nonfinite}"
        if ahead
        else ""
    )
    then = "; then " + ", ".join(f"{r} at {s}" for r, s in later) if later else ""
    scored = score_forecast(alarms, first_nonfinite, last_step)
    said = f"; {scored['said']}" if scored else ""
    dumped = next((a for a in alarms if a.get("dumped")), None)
    return Finding(
        "alarms.recorded",
        "warning",
        f"the live monitors alarmed at step {step} ({rule}){lead}{then}{said}",
        _remedy(dumped),
        {"first": dict(order), "first_nonfinite": first_nonfinite, "forecast": scored},
        commands=[Invocation("replay", options={"from_step": dumped["step"]})] if dumped else [],
    )


def score_forecast(
    alarms: list[dict[str, Any]], first_nonfinite: int | None, last_step: int | None
) -> dict[str, Any] | None:
    """The first alarm with a forecast, against the steps the overflow really took."""
    alarm = next((a for a in alarms if a.get("forecast")), None)
    if alarm is None:
        return None
    predicted = float(alarm["forecast"]["steps_to_overflow"])
    if first_nonfinite is None or first_nonfinite < alarm["step"]:
        seen = None if last_step is None else last_step - alarm["step"]
        due = seen is not None and seen >= FACTOR * predicted
        said = (
            f"its forecast of an overflow in ≈ {predicted:.0f} steps did not come true in the "
            f"{seen} steps logged after it"
            if due
            else f"its forecast of an overflow in ≈ {predicted:.0f} steps was not yet due"
        )
        return {
            "predicted": predicted,
            "actual": None,
            "held": False if due else None,
            "said": said,
        }
    actual = first_nonfinite - alarm["step"]
    ratio = predicted / max(actual, 1)
    held = 1 / FACTOR <= ratio <= FACTOR
    if held:
        verdict = f"held: it took {actual}"
    elif ratio > 1:
        verdict = f"came true {ratio:.2g}× sooner: it took {actual}"
    else:
        verdict = f"came true {1 / ratio:.2g}× later: it took {actual}"
    said = f"its forecast of an overflow in ≈ {predicted:.0f} steps {verdict}"
    return {"predicted": predicted, "actual": actual, "ratio": ratio, "held": held, "said": said}


def _remedy(dumped: dict[str, Any] | None) -> str:
    if dumped:
        return (
            f"replay from step {dumped['step']}: the alarm's dump kept the pre-step checkpoint "
            "and the batches before it"
        )
    return (
        "record with on_alarm='dump' to keep the state where the alarm fired (replay starts "
        "there), or 'skip' to drop a bad batch's update"
    )
