"""The terminal view of `diff`: the verdict, the first diverging op, the modules it reached."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from energydiag.report.console import frame, key_values


def diff(console: Console, r: dict[str, Any]) -> None:
    against = f" against {r['against']}" if r["against"] else f" against {escape(r['b'])}"
    console.print(f"[bold]{escape(r['a'])}[/bold] step {r['step']}{against}: {r['verdict']}")
    first = r["first_divergence"]
    key_values(
        console,
        "",
        [
            *_range(r.get("steps") or [], None if first else r["verdict"]),
            *compared(r),
            ("unpaired", f"{r['unmatched'][0]} on A, {r['unmatched'][1]} on B"),
            ("loss", f"{r['loss'][0]:.9g} and {r['loss'][1]:.9g}"),
            ("parameters after", _parameters(r["parameters"])),
        ],
    )
    if first is None:
        return
    shadow = first["shadow"] or {}
    key_values(
        console,
        "First divergence",
        [
            (
                f"first diverging {unit(r)}",
                f"{located(first)} ({where(first)})",
            ),
            ("paired with", partner(first)),
            ("relative difference", f"{first['relative']:.3g}"),
            ("inputs", inputs(first)),
            ("float64 re-run", rerun(r, shadow)),
        ],
    )
    rows = [(m["module"], m["largest"], m["op"]) for m in r["modules"] if m["largest"] > 0]
    frame(console, "Largest difference per module", ["module", "relative", "op"], rows, digits=3)
    _stretches(console, r.get("unmatched_stretches") or [])


def compared(r: dict[str, Any]) -> list[tuple[str, str]]:
    """What was compared: the watch of the step and, where it saw the sides part, the ops of
    that phase."""
    pairs, phase = f"{paired(r)}{_bits(r)}", r.get("named_in")
    if not phase:
        return [(watched(r), pairs)]
    a, b = r["watched"]
    return [(_by_module(r), f"{a} and {b}, apart in the {phase}"), (f"ops of the {phase}", pairs)]


def paired(r: dict[str, Any]) -> str:
    stats = r.get("by_statistics") or 0
    by = f" ({stats} by statistics)" if stats else ""
    return f"{r['ops'][0]} and {r['ops'][1]}, {r['aligned']} paired{by}"


def partner(first: dict[str, Any]) -> str | None:
    """B's op, when it is another one that computed the same value."""
    if first.get("paired_by") != "statistics":
        return None
    return f"B's {first['b_op']} (occurrence {first['b_occurrence']}), by statistics"


def _stretches(console: Console, stretches: list[dict[str, Any]]) -> None:
    rows = [
        (s["side"].upper(), s["phase"], s["module"], s["count"], ", ".join(s["ops"]))
        for s in stretches
    ]
    if rows:
        frame(console, "Unpaired", ["side", "phase", "module", "ops", "first ops"], rows)


UNITS = {"module": "module", "gradient": "gradient"}  # level -> what one pair is
WATCHED = {"gradient": "gradients the step left"}


def unit(r: dict[str, Any]) -> str:
    """What was fingerprinted and paired: every op, every module (under torch.compile), or the
    gradients (across ranks)."""
    return UNITS.get(r.get("level", "op"), "op")


def watched(r: dict[str, Any]) -> str:
    level = r.get("level", "op")
    return _by_module(r) if level == "module" else WATCHED.get(level, "ops")


def _by_module(r: dict[str, Any]) -> str:
    """A compiled side is watched without the state the step leaves (Adam moves a parameter
    whose gradient is rounding noise otherwise, by design)."""
    compiled = (r["against"] or "").startswith("compile")
    return "module outputs, loss, gradients" + ("" if compiled else ", parameters, state")


def inputs(first: dict[str, Any]) -> str:
    apart = first["differing_inputs"]
    return f"apart: {', '.join(apart)}" if apart else "matched"


def located(first: dict[str, Any]) -> str:
    """The op and its module; the loss's own ops run outside every module."""
    module = first["module"]
    return f"{first['op']} in '{module}'" if module else f"{first['op']}, outside every module"


def where(first: dict[str, Any]) -> str:
    """Its phase, micro-batch (a later one's only: the first is every step's) and occurrence."""
    micro = first.get("micro_batch") or 1
    shown = [f"micro-batch {micro}"] if micro > 1 else []
    return ", ".join([first["phase"], *shown, f"occurrence {first['occurrence']}"])


def rerun(r: dict[str, Any], shadow: dict[str, Any] | None) -> str | None:
    """The float64 re-run's line, or what judged the difference instead."""
    if shadow:
        return f"A off by {shadow['error_a']:.3g}, B by {shadow['error_b']:.3g}"
    if r.get("noise_bound") is not None and r.get("gradient_gap") is not None:
        return (
            f"none (an average across ranks): all gradients {r['gradient_gap']:.3g} apart, "
            f"reordering allows {r['noise_bound']:.3g}"
        )
    return None


def _parameters(gap: dict[str, Any]) -> str:
    if not gap["most_different"]:
        return "none compared"
    if not gap["relative"]:
        return "identical"
    return f"{gap['most_different']} differs most ({gap['relative']:.3g} relative)"


def _range(steps: list[int], agreed: str | None) -> list[tuple[str, str]]:
    """A range's line: how many steps replayed alike before the one reported (``agreed``: the
    verdict when none differed)."""
    if len(steps) != 2 or steps[0] == steps[1]:
        return []
    if agreed:
        return [("steps", f"{steps[0]}..{steps[1]}: every step {agreed}")]
    same = steps[1] - steps[0]
    return [("steps", f"{steps[0]}..{steps[1]}: the {same} before step {steps[1]} identical")]


def _bits(r: dict[str, Any]) -> str:
    return ", every bit compared" if r.get("bitwise") else ""
