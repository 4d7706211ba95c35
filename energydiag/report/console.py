"""Rich rendering for people. Nothing here computes; it only lays out what analyses returned."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.markup import escape
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
        table.add_row(key, escape(fmt(value)))
    console.print(table)


def frame(
    console: Console, title: str, columns: list[str], rows: Iterable[Iterable[Any]], digits: int = 4
) -> None:
    table = Table(title=title, title_justify="left")
    for c in columns:
        left = c in ("tensor", "layer", "module", "op", "variant", "name", "reason")
        table.add_column(c, justify="left" if left else "right", no_wrap=not left)
    for row in rows:
        table.add_row(*(escape(fmt(v, digits)) for v in row))
    console.print(table)


def fidelity_text(fid: dict[str, Any]) -> str:
    """What the comparison with the log showed, and what it could not."""
    if fid["compared"] == 0:
        return "unknown: no finite logged loss compared"
    if fid["bit_exact"]:
        checks = len(fid["parameter_checks"])
        extra = f" and parameters at {checks} checkpoint(s)" if checks else ""
        return f"bit-exact over {fid['compared']} finite logged step(s){extra}"
    text = f"max |Δloss| {fmt(fid['max_loss_deviation'])} over {fid['compared']} step(s)"
    if fid["max_parameter_deviation"] is not None:
        text += f", max |Δθ| {fmt(fid['max_parameter_deviation'])}"
    return text + f" (expected: {fid['expected']})"


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
        ],
    )
    if result["fault"]:
        fault_panel(console, result["fault"])
    columns = result["columns"]
    steps = result["steps"][-5:]
    keys = ["step", *(k for k in columns if any(k in r for r in steps))]
    labels = ["step", *(columns[k]["label"] for k in keys[1:])]
    rows = ([_formatted(r.get(k), columns.get(k)) for k in keys] for r in steps)
    frame(console, "Last steps", labels, rows)
    findings(console, [Finding(**f) for f in result["findings"]])


def _formatted(value: Any, column: dict[str, str] | None) -> Any:
    if column is None or not isinstance(value, float) or not math.isfinite(value):
        return value
    return format(value, column["format"])


def fault_panel(console: Console, fault: dict[str, Any]) -> None:
    rows = [
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
            ("op inputs", "; ".join(_summary(s) for s in op["inputs"])),
            ("op detail", ", ".join(f"{k}={fmt(v)}" for k, v in op["detail"].items()) or None),
        ]
    rows += [(k, fault[k]) for k in ("tensor", "sample", "exception") if fault.get(k) is not None]
    if fault["parameters"]:
        rows.append(("parameters", ", ".join(fault["parameters"][:5])))
    if fault["largest"]:
        rows.append(("largest", ", ".join(f"{k} {fmt(v)}" for k, v in fault["largest"].items())))
    console.print(
        Panel.fit(
            "\n".join(f"[bold]{k}[/bold]: {escape(fmt(v))}" for k, v in rows if v is not None),
            title="First non-finite value",
            border_style="red",
        )
    )


def _summary(s: dict[str, Any]) -> str:
    bad = ", ".join(
        f"{s[k]} {n}" for k, n in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf")) if s[k]
    )
    rng = f"[{fmt(s['min'])}, {fmt(s['max'])}]" if s["finite_count"] else "[no finite values]"
    return f"{s['shape']} {rng}" + (f" with {bad}" if bad else "")


def inspect(console: Console, report: dict[str, Any], all_tensors: bool = False) -> None:
    ckpt = report["checkpoint"]
    console.print(
        f"[bold]{escape(ckpt['path'])}[/bold]  step {fmt(ckpt['step'])}, {len(ckpt['tensors'])} tensors"
    )
    cols = ["group", "layer", "numel", "l2", "max_abs", "min", "max", "nonfinite"]
    frame(console, "Layers", cols, ([r[c] for c in cols] for r in ckpt["layers"]))
    shown = [t for t in ckpt["tensors"] if all_tensors or t["nan"] or t["posinf"] or t["neginf"]]
    if shown:
        cols = [
            "name",
            "shape",
            "dtype",
            "nan",
            "posinf",
            "neginf",
            "first_nonfinite",
            "min",
            "max",
            "std",
        ]
        title = "Tensors" if all_tensors else "Tensors with non-finite values"
        frame(console, title, cols, ([t[c] for c in cols] for t in shown))
    if report["batch"]:
        _batch(console, report["batch"])
    for note in report["notes"]:
        console.print(f"[dim]note: {escape(note)}[/dim]")
    findings(console, [Finding(**f) for f in report["findings"]])


def _batch(console: Console, b: dict[str, Any]) -> None:
    e, head = b["energy"], b["head"]
    key_values(
        console,
        f"Energy model on the batch of step {b['step']} (B={b['batch_size']}, "
        f"{b['candidates']} candidates per row, loss {b['loss_name']}, "
        f"tau={fmt(b['tau'])} from {b['tau_source']})",
        [
            ("loss", b["loss"]),
            (
                "energy range",
                f"[{fmt(e['energy_min'])}, {fmt(e['energy_max'])}]  std {fmt(e['energy_std'])}",
            ),
            ("positives", f"mean {fmt(e['pos_mean'])}  std {fmt(e['pos_std'])}"),
            ("negatives", f"mean {fmt(e['neg_mean'])}  std {fmt(e['neg_std'])}"),
            ("gap (neg - pos)", e["pos_neg_gap"]),
            (
                "retrieval accuracy",
                f"{fmt(e['retrieval_accuracy'])} (chance {fmt(1 / b['candidates'])})",
            ),
            (
                "logit spread",
                f"{fmt(e.get('logit_spread'))} overall, {fmt(e.get('logit_spread_row_mean'))} per row",
            ),
            (
                "head bounds",
                f"[{fmt(head['bounds'][0])}, {fmt(head['bounds'][1])}] from {head['source']}"
                if head
                else None,
            ),
            *(
                (f"loss bounds ({k})", f"floor {fmt(v['floor'])}  chance {fmt(v['chance'])}")
                for k, v in b["bounds"].items()
            ),
            (
                "loss position",
                f"{b['loss_position']:.1%} of the way from floor to chance"
                if b["loss_position"] is not None
                else None,
            ),
        ],
    )
    if b["saturation"]:
        frame(
            console,
            "Saturation (outputs within 1e-3 of the limits; softmax rows one-hot)",
            ["module", "op", "total", "fraction"],
            ([s["module"], s["op"], s["total"], s["fraction"]] for s in b["saturation"]),
        )
    cols = ["module", "kind", "min", "max", "std", "nonfinite", "output_grad_norm"]
    frame(
        console, "Activations in execution order", cols, ([r[c] for c in cols] for r in b["layers"])
    )
    frame(
        console,
        "Parameter gradient norms by layer",
        ["layer", "grad norm"],
        b["param_grad_norms"].items(),
    )


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
        "exploded": "exploded",
    }
    rows = (
        [
            r[k] if r["readable"] else (r["problem"] if k == "worst_layer" else None)
            for k in cols.values()
        ]
        for r in t["rows"]
    )
    frame(console, "Checkpoints over time", list(cols), rows, digits=3)
    findings(console, [Finding(**f) for f in t["findings"]])


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
                ("step", fault["step"]),
                ("phase", fault["phase"]),
                ("module", fault["module"]),
                ("op", op.get("op")),
            )
            if v is not None
        )
        console.print(f"  first non-finite value: {where}")
    findings(console, [Finding(**f) for f in d["findings"][:limit]])
    console.print()


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
    findings(console, [Finding(**f) for f in r["findings"]])


def curves(console: Console, r: dict[str, Any], spark: str) -> None:
    console.print(f"[bold]{r['metric']}[/bold]  {r['points']} points  window {r['window']}")
    values = r["display"]["value"]
    console.print(
        f"  {spark}  [dim]range [{fmt(min(values, default=None))}, {fmt(max(values, default=None))}][/dim]"
    )
    b = r["bounds"]
    if b:
        parts = [f"chance log({b['batch_size']}) = {fmt(b['chance'])}"]
        if "floor" in b:
            parts.append(
                f"floor {fmt(b['floor'])} (energy span {fmt(b['energy_span'])}, tau {fmt(b['tau'])})"
            )
        console.print("  bounds: " + ", ".join(parts))
    rows = [("plateau", p["start"], p["end"], p["level"]) for p in r["plateaus"]]
    rows += [("constant", c["start"], c["end"], c["level"]) for c in r["constant"]]
    rows += [("oscillation", o["start"], o["end"], o["level"]) for o in r["oscillations"]]
    rows += [("spike", s["step"], s["step"], s["value"]) for s in r["spikes"]]
    if r["divergence"]:
        rows.append(
            (
                "divergence",
                r["divergence"]["start"],
                r["divergence"]["end"],
                r["divergence"]["level"],
            )
        )
    if r["first_nonfinite"] is not None:
        rows.append(("first non-finite", r["first_nonfinite"], r["first_nonfinite"], None))
    if rows:
        frame(
            console,
            "Segments",
            ["what", "from step", "to step", "level"],
            sorted(rows, key=lambda x: x[1]),
        )
    findings(console, [Finding(**f) for f in r["findings"]])


def whatif(console: Console, r: dict[str, Any]) -> None:
    cols = {
        "#": "rank",
        "variant": "label",
        "loss from": "loss_start",
        "to": "loss_end",
        "drop": "relative_drop",
        "E span": "energy_span",
        "logit spread": "logit_spread",
        "saturated": "saturation",
        f"|g| {r['input_layer']}": "input_layer_grad_norm",
    }
    title = f"What-if: {r['steps']} logged steps from checkpoint {r['from_step']}"
    rows = [{**x, "relative_drop": _drop(x)} for x in sorted(r["results"], key=lambda x: x["rank"])]
    frame(console, title, list(cols), ([x[key] for key in cols.values()] for x in rows), digits=3)
    findings(console, [Finding(**f) for f in r["findings"]])


def _drop(x: dict[str, Any]) -> str:
    if x["exception"]:
        return "raised"
    if not x["finite"] or x["relative_drop"] is None:
        return "non-finite"
    return f"{x['relative_drop']:.1%}"


def check(console: Console, r: dict[str, Any]) -> None:
    style = {"passed": "green", "failed": "bold red", "skipped": "dim"}
    table = Table(title=f"energydiag check: {r['run']}", title_justify="left")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for c in r["checks"]:
        table.add_row(c["name"], Text(c["status"], style=style[c["status"]]), c["message"])
    console.print(table)
    failed = sum(c["status"] == "failed" for c in r["checks"])
    console.print(
        Text(
            "all checks passed" if not failed else f"{failed} check(s) failed",
            style="green" if not failed else "bold red",
        )
    )
