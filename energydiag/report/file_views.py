"""How inspect and curves look in a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from energydiag.report.console import (
    findings,
    fmt,
    frame,
    key_values,
    sparkline,
)


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
    findings(console, report["findings"])


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


def curves(console: Console, r: dict[str, Any]) -> None:
    console.print(f"[bold]{r['metric']}[/bold]  {r['points']} points  window {r['window']}")
    values = r["display"]["value"]
    console.print(
        f"  {sparkline(values)}  [dim]range [{fmt(min(values, default=None))}, {fmt(max(values, default=None))}][/dim]"
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
    if r["unstable"]:
        rows.append(
            ("erratic (×)", r["unstable"]["start"], r["unstable"]["end"], r["unstable"]["level"])
        )
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
    findings(console, r["findings"])
