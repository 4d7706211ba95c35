"""Rich rendering for people. Nothing here computes; it only lays out what analyses returned."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from energydiag.findings.base import Invocation


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


def findings(console: Console, items: list[dict[str, Any]]) -> None:
    """Findings as a report's JSON holds them: title, remedy, and the commands that go further.
    (The rules package is imported here, when there is something to draw, not at start-up.)"""
    from energydiag.findings.base import Finding

    if not items:
        console.print("[green]No findings.[/green]")
        return
    for i, f in enumerate(map(Finding.from_dict, items), start=1):
        console.print(Text.assemble((f"{i}. {f.severity.upper():8}", STYLE[f.severity]), f.title))
        console.print(Text(f"   remedy: {f.remedy}", style="dim"))
        for command in f.commands:
            console.print(Text(f"   run: {command_line(command)}", style="dim"))


def command_line(command: Invocation) -> str:
    """The CLI's spelling: an argument ``from_step`` is the option ``--from-step``, as Typer
    derives it (tests/test_help.py checks every suggested option exists)."""
    words = ["energydiag", command.command, command.target]
    for name, value in command.options.items():
        words.append("--" + name.replace("_", "-"))
        if value is not True:
            words.append(str(value))
    return " ".join(words)


def key_values(console: Console, title: str, rows: Iterable[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, escape(fmt(value)))
    console.print(table)


def frame(
    console: Console, title: str, columns: list[str], rows: Iterable[Iterable[Any]], digits: int = 4
) -> None:
    table = Table(title=title, title_justify="left")
    for c in columns:
        left = c in ("tensor", "layer", "module", "op", "variant", "name", "reason")
        table.add_column(
            c, justify="left" if left else "right", no_wrap=not left, min_width=min(len(c), 8)
        )
    for row in rows:
        table.add_row(*(escape(fmt(v, digits)) for v in row))
    console.print(table)


def formatted(value: Any, column: dict[str, str] | None) -> Any:
    if column is None or not isinstance(value, float) or not math.isfinite(value):
        return value
    return format(value, column["format"])


def sparkline(values: list[float], width: int = 60) -> str:
    """One block character per bin (the median of each): the curve at terminal size."""
    if not values:
        return ""
    bins = min(width, len(values))
    edges = [round(i * len(values) / bins) for i in range(bins + 1)]
    medians = [statistics.median(values[a:b]) for a, b in zip(edges, edges[1:], strict=False)]
    lo, hi = min(medians) / 2, max(medians) / 2  # halved: hi - lo cannot overflow at ±1e308
    blocks = "▁▂▃▄▅▆▇█"
    if hi == lo:
        return blocks[0] * len(medians)
    return "".join(blocks[round((m / 2 - lo) / (hi - lo) * (len(blocks) - 1))] for m in medians)


def summary(s: dict[str, Any]) -> str:
    bad = ", ".join(
        f"{s[k]} {n}" for k, n in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf")) if s[k]
    )
    rng = f"[{fmt(s['min'])}, {fmt(s['max'])}]" if s["finite_count"] else "[no finite values]"
    return f"{s['shape']} {rng}" + (f" with {bad}" if bad else "")


def fault_panel(console: Console, fault: dict[str, Any]) -> None:
    rows = [
        ("rank", fault.get("rank")),
        ("step", fault["step"]),
        ("phase", fault["phase"]),
        ("micro-batch", fault["micro_batch"] if (fault["micro_batch"] or 0) > 1 else None),
        ("module", fault["module"]),
        ("reproduced", fault["reproduced"]),
    ]
    op = fault.get("op")
    if op:
        rows += [
            ("op", op["op"] + (f" ({op['autograd_node']})" if op["autograd_node"] else "")),
            ("op phase", op["phase"]),
            ("gained", op["gained"]),
            ("op inputs", "; ".join(summary(s) for s in op["inputs"])),
            ("op detail", ", ".join(f"{k}={fmt(v)}" for k, v in op["detail"].items()) or None),
        ]
    rows += [(k, fault[k]) for k in ("tensor", "sample", "exception") if fault.get(k) is not None]
    if fault["parameters"]:
        rows.append(("parameters", ", ".join(fault["parameters"][:5])))
    if fault["largest"]:
        rows.append(("largest", ", ".join(f"{k} {fmt(v)}" for k, v in fault["largest"].items())))
    rows += [("note", note) for note in fault["notes"]]
    console.print(
        Panel.fit(
            "\n".join(f"[bold]{k}[/bold]: {escape(fmt(v))}" for k, v in rows if v is not None),
            title="First non-finite value",
            border_style="red",
        )
    )


def fidelity_text(fid: dict[str, Any]) -> str:
    """What the comparison with the log showed, and what it could not."""
    if fid["compared"] == 0:
        return "unknown: no finite logged loss compared"
    if fid["bit_exact"]:
        checks = len(fid["parameter_checks"])
        extra = f" and parameters at {checks} checkpoint(s)" if checks else ""
        caveat = (
            " so far: what it lacks can still diverge later"
            if fid["expected"] != "bit-exact"
            else ""
        )
        return f"bit-exact over {fid['compared']} finite logged step(s){extra}{caveat}"
    text = f"max |Δloss| {fmt(fid['max_loss_deviation'])} over {fid['compared']} step(s)"
    if fid["max_parameter_deviation"] is not None:
        text += f", max |Δθ| {fmt(fid['max_parameter_deviation'])}"
    return text + f" (expected: {fid['expected']})"
