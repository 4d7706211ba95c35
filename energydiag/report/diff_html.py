"""The `diff` report as one self-contained HTML page: the verdict, the first diverging op's
card, and the largest difference per module along the step as inline SVG bars (log scale).

It renders the diff JSON (``diff --json`` prints the same document), so the page shows no
number the JSON does not hold.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from energydiag.analyses.numerics_diff import AGREE
from energydiag.report.diff_view import compared, inputs, located, partner, rerun, unit, where
from energydiag.report.html import STYLE

BAR_WIDTH = 520  # pixels for 16 decades, 1e-16 (left) to 1 (right)


def page(r: dict[str, Any]) -> str:
    against = r["against"] or r["b"]
    body = [
        f"<h1>energydiag diff: <code>{escape(r['a'])}</code> step {r['step']}</h1>",
        f"<p>against <code>{escape(against)}</code>, each side replayed from checkpoint "
        f"{r['replayed_from'][0]} and {r['replayed_from'][1]}</p>",
        f'<p class="verdict {_tone(r)}">{escape(r["verdict"])}</p>',
        _summary(r),
        f"<h2>First diverging {unit(r)}</h2>",
        _card(r),
        "<h2>Largest difference per module, in execution order</h2>",
        _bars(r["modules"], r["tolerance"]),
        *_unpaired(r.get("unmatched_stretches") or []),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>energydiag diff: {escape(r['a'])}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def _tone(r: dict[str, Any]) -> str:
    return "healthy" if r["verdict"] in AGREE else "other"


def _summary(r: dict[str, Any]) -> str:
    rows = [
        *compared(r),
        ("unpaired", f"{r['unmatched'][0]} on A, {r['unmatched'][1]} on B"),
        ("loss", f"{r['loss'][0]:.9g} and {r['loss'][1]:.9g}"),
        ("tolerance", f"{r['tolerance']:.3g} relative"),
    ]
    return _table(rows)


def _card(r: dict[str, Any]) -> str:
    first, kind = r["first_divergence"], unit(r)
    if first is None:
        return f'<p class="missing">no {kind} differs by more than {r["tolerance"]:.3g}</p>'
    shadow = first["shadow"]
    rows = [
        (kind, located(first)),
        ("where", where(first)),
        *([("paired with", partner(first))] if partner(first) else []),
        ("relative difference", f"{first['relative']:.3g}"),
        ("inputs", inputs(first)),
        ("A output [norm, sum]", ", ".join(_pair(o) for o in first["a"])),
        ("B output [norm, sum]", ", ".join(_pair(o) for o in first["b"])),
        (
            "float64 re-run",
            rerun(r, shadow)
            or "not re-run (its inputs differed, or an in-place op, a gradient, a module that "
            "draws random numbers or casts itself)",
        ),
    ]
    return f'<div class="card">{_table(rows)}</div>'


def _unpaired(stretches: list[dict[str, Any]]) -> list[str]:
    rows = [
        (
            f"{s['side'].upper()}, {s['phase']}, '{s['module']}'",
            f"{s['count']}: {', '.join(s['ops'])}",
        )
        for s in stretches
    ]
    return ["<h2>Unpaired, in stretches</h2>", _table(rows)] if rows else []


def _bars(modules: list[dict[str, Any]], tolerance: float) -> str:
    rows = []
    for m in modules:
        gap = m["largest"]
        width = 0 if gap <= 0 else max(2, BAR_WIDTH * (16 + math.log10(min(gap, 1.0))) / 16)
        colour = "#b42318" if gap > tolerance else "#17803d"
        bar = (
            f'<svg width="{BAR_WIDTH}" height="12"><rect width="{width:.0f}" height="12" '
            f'fill="{colour}"/></svg>'
        )
        rows.append((m["module"], bar, f"{gap:.3g}" if gap else "0", m["op"]))
    if not rows:
        return '<p class="missing">no module ran</p>'
    head = "<tr><th>module</th><th>1e-16 … 1</th><th>relative</th><th>op</th></tr>"
    cells = "".join(
        f"<tr><td><code>{escape(a)}</code></td><td>{b}</td><td>{c}</td><td>{escape(d)}</td></tr>"
        for a, b, c, d in rows
    )
    return f"<table>{head}{cells}</table>"


def _pair(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.9g}" for v in values) + "]"


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"
