"""How `energydiag landscape` looks in a terminal: the set-up, one row per context, findings."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from energydiag.report.console import findings, frame, key_values, sparkline


def landscape(console: Console, r: dict[str, Any]) -> None:
    key_values(
        console,
        f"Refinement under the energy: {r['checkpoint']} (batch of step {r['step']})",
        [
            ("refiner", r["refiner"]),
            ("starting actions", r["start"]),
            ("modules in training mode", ", ".join(r["train_mode_modules"]) or "none"),
            ("|E train − E eval| mean / max", f"{r['mode_gap']['mean']:.3g} / {r['mode_gap']['max']:.3g}"),
            ("steps where E rose", f"{r['rising_fraction']:.0%}"),
            ("largest stable step size", r["stable_alpha"]),
        ],
    )  # fmt: skip
    columns = [
        "row",
        "E start",
        "E end",
        "rose",
        "moved",
        "E demo",
        "to demo",
        "line minima",
        "E along chain",
    ]
    rows = (
        [x["row"], x["energy_start"], x["energy_end"], f"{x['rising_fraction']:.0%}", x["moved"],
         x["demo_energy"], x["distance_to_demo"], x["line_local_minima"], sparkline(x["energy_chain"], 24)]
        for x in r["rows"]
    )  # fmt: skip
    frame(console, "Per context", columns, rows, digits=3)
    findings(console, r["findings"])
