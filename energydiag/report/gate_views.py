"""How whatif and check look in a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from energydiag.report.console import (
    findings,
    frame,
)


def whatif(console: Console, r: dict[str, Any]) -> None:
    cols = {
        "#": "rank",
        "variant": "label",
        "loss from": "loss_start",
        "to": "loss_end",
        "loss Δ": "relative_drop",
        "E span": "energy_span",
        "logit spread": "logit_spread",
        "saturated": "saturation",
        f"|g| {r['input_layer']}": "input_layer_grad_norm",
    }
    title = f"What-if: {r['steps']} logged steps from checkpoint {r['from_step']}"
    rows = [{**x, "relative_drop": _drop(x)} for x in sorted(r["results"], key=lambda x: x["rank"])]
    frame(console, title, list(cols), ([x[key] for key in cols.values()] for x in rows), digits=3)
    findings(console, r["findings"])


def _drop(x: dict[str, Any]) -> str:
    if x["exception"]:
        return "raised"
    if not x["finite"] or x["relative_drop"] is None:
        return "non-finite"
    return f"{-x['relative_drop']:+.1%}"  # signed: a rise is never shown as a drop


def check(console: Console, r: dict[str, Any]) -> None:
    style = {"passed": "green", "failed": "bold red", "skipped": "dim"}
    table = Table(title=f"energydiag check: {r['run']}", title_justify="left")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for c in r["checks"]:
        table.add_row(c["name"], Text(c["status"], style=style[c["status"]]), c["message"])
    console.print(table)
    failed = sum(c["status"] == "failed" for c in r["checks"])
    skipped = f", {r['skipped']} skipped" if r["skipped"] else ""
    console.print(
        Text(
            f"all checks passed{skipped}" if not failed else f"{failed} check(s) failed{skipped}",
            style="green" if not failed else "bold red",
        )
    )
    for why in r["unmeasured"]:
        console.print(Text(f"  skipped: {why}", style="dim"))
