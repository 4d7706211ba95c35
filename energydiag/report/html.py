"""One self-contained HTML page for a run: no network, every image inlined as a PNG data URL.

It renders the overview JSON (``energydiag report --json`` prints the same document), so the
page never shows a number that the JSON does not hold. Every section is always present; one
whose data could not be made says why instead of disappearing.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from html import escape
from typing import Any

from energydiag.findings.base import Invocation
from energydiag.report import figures, plot
from energydiag.report.console import command_line, fmt

SECTIONS = {
    "summary": "Verdict",
    "fault": "First non-finite value",
    "findings": "Findings and remedies",
    "loss-curve": "Loss curve",
    "energy-matrix": "Energy matrix of the inspected batch",
    "layers": "Layers over the checkpoints",
    "saturation": "Saturation per squashing op",
    "landscape": "Action refinement under the energy",
}

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; border-bottom: 1px solid #ddd; }
.verdict { font-size: 1.25rem; font-weight: 600; }
.verdict.healthy { color: #17803d; } .verdict.other { color: #b42318; }
.card { border-left: 4px solid #b42318; background: #fdf3f2; padding: .6rem 1rem; }
.finding { margin: .5rem 0; padding: .5rem .8rem; border-radius: 4px; background: #f6f6f6; }
.finding.error { border-left: 4px solid #b42318; } .finding.warning { border-left: 4px solid #c4720b; }
.finding.note { border-left: 4px solid #777; } .remedy { color: #135e96; }
.command { color: #444; margin-top: 0.2rem; }
.missing { color: #777; font-style: italic; } img { max-width: 100%; }
td, th { padding: .15rem .6rem; text-align: left; } code { background: #f1f1f1; padding: 0 .2rem; }
"""


def page(data: dict[str, Any]) -> str:
    plt = plot.pyplot()
    body = [f"<h1>energydiag report: <code>{escape(data['run'])}</code></h1>"]
    for anchor, title in SECTIONS.items():
        body.append(f'<section id="{anchor}"><h2>{escape(title)}</h2>')
        body.append(RENDERERS[anchor](data, plt))
        body.append("</section>")
    if data["notes"]:
        body.append("<h2>Not shown</h2><ul>" + "".join(_li(n) for n in data["notes"]) + "</ul>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>energydiag: {escape(data['run'])}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def _summary(data: dict[str, Any], plt: Any) -> str:
    d = data["diagnosis"]
    kind = "healthy" if d["verdict"] == "healthy" else "other"
    loss = f"loss {fmt(d['loss_start'])} → {fmt(d['loss_end'])} (first/last 10% of the log)"
    return f'<p class="verdict {kind}">{escape(d["verdict"])}</p><p>{escape(loss)}</p>'


def _fault(data: dict[str, Any], plt: Any) -> str:
    fault = data["diagnosis"]["fault"]
    if fault is None:
        logged = (data.get("curves") or {}).get("first_nonfinite")
        if logged is not None:  # the page's curve marks it: the card must not deny it
            return _missing(
                f"the log goes non-finite at step {logged}, but no replay localised it "
                "(the findings say what was missing)"
            )
        return _missing("no step went non-finite in the replayed steps or the log")
    op = fault.get("op") or {}
    rows = [
        ("rank", fault.get("rank")),
        ("step", fault["step"]),
        ("phase", fault["phase"]),
        ("module", fault.get("module")),
        ("op", op.get("op")),
        ("micro-batch", fault.get("micro_batch")),
        ("sample", fault.get("sample")),
        ("inputs", "; ".join(_tensor(t) for t in op.get("inputs", []))),
        ("output", _tensor(op["output"]) if op.get("output") else None),
    ]
    table = "".join(
        f"<tr><th>{k}</th><td>{escape(str(v))}</td></tr>" for k, v in rows if v not in (None, "")
    )
    notes = "".join(_li(n) for n in fault.get("notes", []))
    return f'<div class="card"><p>{escape(fault["summary"])}</p><table>{table}</table><ul>{notes}</ul></div>'


def _tensor(t: dict[str, Any]) -> str:
    bad = {k: t[k] for k in ("nan", "posinf", "neginf") if t.get(k)}
    return f"{t['shape']} range [{fmt(t['min'])}, {fmt(t['max'])}]" + (
        f" non-finite {bad}" if bad else ""
    )


def _findings(data: dict[str, Any], plt: Any) -> str:
    found = data["diagnosis"]["findings"]
    if not found:
        return "<p>No findings.</p>"
    return "".join(
        f'<div class="finding {escape(f["severity"])}"><b>{escape(f["severity"])}</b> '
        f"<code>{escape(f['code'])}</code> {escape(f['title'])}"
        f'<div class="remedy">→ {escape(f["remedy"])}{_commands(f)}</div></div>'
        for f in found
    )


def _commands(finding: dict[str, Any]) -> str:
    lines = [command_line(Invocation.from_dict(c)) for c in finding.get("commands", [])]
    return "".join(f'<div class="command">run: <code>{escape(line)}</code></div>' for line in lines)


def _curve(data: dict[str, Any], plt: Any) -> str:
    curves = data["curves"]
    if curves is None:
        return _missing("no metric log to draw")
    marks = [f"{k} {len(curves[k])}" for k in ("plateaus", "spikes", "oscillations") if curves[k]]
    caption = f"'{curves['metric']}'" + (f", marked: {', '.join(marks)}" if marks else "")
    return _image(plot.curve_figure(curves, plt), caption)


def _matrix(data: dict[str, Any], plt: Any) -> str:
    batch = (data["inspect"] or {}).get("batch")
    if not batch or not batch.get("energy_matrix"):
        return _missing("no batch was run through the model (see the notes below)")
    e = batch["energy"]
    stats = [f"{k} {fmt(e[k], 7)}" for k in ("energy_min", "energy_max", "energy_std") if k in e]
    shown = len(batch["energy_matrix"])
    corner = f" (its first {shown} rows)" if shown < batch["batch_size"] else ""
    caption = f"step {batch['step']}, tau {fmt(batch['tau'])}, diagonal boxed{corner}: "
    return _image(figures.energy_matrix_figure(batch, plt), caption + ", ".join(stats))


def _layers(data: dict[str, Any], plt: Any) -> str:
    if data["timeline"] is None:
        return _missing("no readable checkpoints")
    caption = "the five largest layers are labelled; gradients are the optimizer's running average"
    return _image(figures.layer_norms_figure(data["timeline"], plt), caption)


def _saturation(data: dict[str, Any], plt: Any) -> str:
    batch = (data["inspect"] or {}).get("batch")
    if not batch:
        return _missing("no batch was run through the model")
    if not batch["saturation"]:
        return "<p>The model has no squashing op (sigmoid, tanh, softmax).</p>"
    return _image(figures.saturation_figure(batch["saturation"], plt), f"step {batch['step']}")


def _landscape(data: dict[str, Any], plt: Any) -> str:
    land = data.get("landscape")
    if not land:
        return _missing("no checkpoint with a batch to refine actions on")
    caption = (
        f"{land['refiner']} from {land['start']}, checkpoint step {land['step']}; energy rose on "
        f"{land['rising_fraction']:.0%} of steps; modules in training mode: "
        f"{', '.join(land['train_mode_modules']) or 'none'}"
    )
    return _image(figures.landscape_figure(land, plt), caption)


def _image(fig: Any, caption: str) -> str:
    encoded = base64.b64encode(plot.png(fig)).decode("ascii")
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _missing(why: str) -> str:
    return f'<p class="missing">Not available: {escape(why)}.</p>'


def _li(text: str) -> str:
    return f"<li>{escape(text)}</li>"


RENDERERS: dict[str, Callable[[dict[str, Any], Any], str]] = {
    "summary": _summary,
    "fault": _fault,
    "findings": _findings,
    "loss-curve": _curve,
    "energy-matrix": _matrix,
    "layers": _layers,
    "saturation": _saturation,
    "landscape": _landscape,
}
