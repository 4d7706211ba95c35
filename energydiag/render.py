"""Rich rendering for people. Nothing here computes; it only lays out what analyses returned."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from energydiag.findings import Finding

STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return f"{value:.{digits}g}"
    return str(value)


def findings(console: Console, items: list[Finding]) -> None:
    if not items:
        console.print("[green]No findings.[/green]")
        return
    for i, f in enumerate(items, start=1):
        console.print(Text.assemble((f"{i}. {f.severity.upper():8}", STYLE[f.severity]), f.title))
        console.print(Text(f"   remedy: {f.remedy}", style="dim"))


def key_values(console: Console, title: str, rows: Iterable[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, fmt(value))
    console.print(table)


def frame(console: Console, title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(
            c, justify="right" if c not in ("tensor", "layer", "module", "op") else "left"
        )
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console.print(table)


def replay(console: Console, result: dict[str, Any]) -> None:
    fid = result["fidelity"]
    key_values(
        console,
        "Replay",
        [
            ("checkpoint", result["checkpoint_step"]),
            ("steps replayed", f"{result['first_step']}–{result['last_step']}"),
            (
                "fidelity",
                "bit-exact"
                if fid["bit_exact"]
                else f"max |Δloss| {fmt(fid['max_loss_deviation'])}"
                f" over {fid['compared']} logged step(s)",
            ),
        ],
    )
    fault = result["fault"]
    if fault:
        rows = [
            ("step", fault["step"]),
            ("phase", fault["phase"]),
            ("module", fault["module"]),
            ("module type", fault["module_kind"]),
            ("reproduced", fault["reproduced"]),
        ]
        op = fault.get("op")
        if op:
            rows += [
                ("op", op["op"]),
                ("gained", op["gained"]),
                ("op inputs", "; ".join(_summary(s) for s in op["inputs"])),
                ("op detail", ", ".join(f"{k}={v}" for k, v in op["detail"].items()) or None),
            ]
        rows += [
            (k, fault[k]) for k in ("tensor", "sample", "exception") if fault.get(k) is not None
        ]
        if fault["parameters"]:
            rows.append(("parameters", ", ".join(fault["parameters"][:5])))
        console.print(
            Panel.fit(
                "\n".join(f"[bold]{k}[/bold]: {fmt(v)}" for k, v in rows),
                title="First non-finite value",
                border_style="red",
            )
        )
    steps = result["steps"][-5:]
    cols = [
        c
        for c in (
            "step",
            "loss",
            "logged_loss",
            "grad_norm",
            "energy_min",
            "energy_max",
            "logit_spread",
            "saturation",
            "update_ratio",
        )
        if any(c in r for r in steps)
    ]
    frame(console, "Last steps", cols, ([r.get(c) for c in cols] for r in steps))
    findings(console, [Finding(**f) for f in result["findings"]])


def _summary(s: dict[str, Any]) -> str:
    bad = ", ".join(
        f"{s[k]} {n}" for k, n in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf")) if s[k]
    )
    return f"{s['shape']} [{fmt(s['min'])}, {fmt(s['max'])}]" + (f" with {bad}" if bad else "")
