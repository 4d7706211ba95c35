"""How replay, bisect, timeline and diagnose look in a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from energydiag.report.console import (
    fault_panel,
    fidelity_text,
    findings,
    fmt,
    formatted,
    frame,
    key_values,
)


def replay(console: Console, result: dict[str, Any]) -> None:
    fid = result["fidelity"]
    lacking = fid["missing"] + fid["environment"]
    key_values(
        console,
        "Replay",
        [
            ("checkpoint", result["checkpoint_step"]),
            ("steps replayed", f"{result['first_step']}–{result['last_step']}"),
            ("fidelity", fidelity_text(fid)),
            ("lacking", "; ".join(lacking) or None),
            ("ranks", _ranks(result.get("ranks"))),
            ("placement", result.get("placement")),
        ],
    )
    if result["fault"]:
        fault_panel(console, result["fault"])
    columns = result["columns"]
    steps = result["steps"][-5:]
    keys = ["step", *(k for k in columns if any(k in r for r in steps))]
    labels = ["step", *(columns[k]["label"] for k in keys[1:])]
    rows = ([formatted(r.get(k), columns.get(k)) for k in keys] for r in steps)
    frame(console, "Last steps", labels, rows)
    findings(console, result["findings"])


def _ranks(ranks: list[dict[str, Any]] | None) -> str | None:
    if not ranks:
        return None
    return ", ".join(
        f"{r['rank']}: " + ("fault at step " + str(r["fault"]["step"]) if r["fault"] else "finite")
        for r in ranks
    )


def bisect(console: Console, r: dict[str, Any]) -> None:
    frame(
        console,
        f"Checkpoint evaluations (predicate: {r['predicate']})",
        ["step", "status", "reason"],
        (
            [e["step"], e["status"], e["reason"]]
            for e in sorted(r["evaluations"], key=lambda e: e["step"])
        ),
    )
    key_values(
        console,
        "Bisect",
        [
            ("first bad step", r["first_bad_step"]),
            ("weights past ×1e3 from step", r["exploded_step"]),
            ("first non-finite step (replayed)", r["first_nonfinite_step"]),
            ("last good checkpoint", r["last_good_checkpoint"]),
            ("first bad checkpoint", r["first_bad_checkpoint"]),
            ("first failure in the log", r["first_logged_failure"]),
            ("checkpoint evaluations", r["checkpoint_evaluations"]),
            ("step replays", r["step_replays"]),
            ("skipped (unreadable)", ", ".join(str(e["step"]) for e in r["skipped"]) or None),
        ],
    )
    if r["fault"]:
        fault_panel(console, r["fault"])
    for w in r["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
    findings(console, r["findings"])


def timeline(console: Console, t: dict[str, Any]) -> None:
    cols = {
        "step": "step",
        "max|w|": "max_abs",
        "rms": "rms",
        "×first": "growth_since_first",
        "×prev": "growth_since_previous",
        "|Δw|/|w|": "update_ratio",
        "layer": "worst_layer",
        "NaN/Inf": "nonfinite",
        "state": "state",
    }
    rows = (
        [
            r[k] if r["readable"] else (r["problem"] if k == "worst_layer" else None)
            for k in cols.values()
        ]
        for r in t["rows"]
    )
    frame(console, "Checkpoints over time", list(cols), rows, digits=3)
    findings(console, t["findings"])


def diagnosis(console: Console, d: dict[str, Any], limit: int = 3) -> None:
    colour = {"healthy": "green", "stalled": "yellow"}.get(d["verdict"], "red")
    trend = f"loss {fmt(d['loss_start'])} → {fmt(d['loss_end'])} (first/last 10% of the log)"
    console.print(
        Text.assemble((f"{d['run']}: ", "bold"), (d["verdict"], f"bold {colour}"), f"  {trend}")
    )
    fault = d["fault"]
    if fault:
        op = fault.get("op") or {}
        where = ", ".join(
            f"{k} {v}"
            for k, v in (
                ("rank", fault.get("rank")),
                ("step", fault["step"]),
                ("phase", fault["phase"]),
                ("module", fault["module"]),
                ("op", op.get("op")),
            )
            if v is not None
        )
        console.print(f"  first non-finite value: {where}")
    findings(console, d["findings"][:limit])
    if len(d["findings"]) > limit:
        console.print(
            Text(f"   … {len(d['findings']) - limit} more finding(s): the JSON report lists all")
        )
    console.print()


def demo(console: Console, d: dict[str, Any]) -> None:
    for run in d["runs"]:
        diagnosis(console, run)


def converted(console: Console, d: dict[str, Any]) -> None:
    console.print(
        f"wrote {d['root']}: {len(d['checkpoint_steps'])} checkpoint(s), "
        f"{len(d['batch_steps'])} batch(es)"
    )
