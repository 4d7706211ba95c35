"""CI formats for `energydiag check`: JUnit XML, GitHub Actions annotations and job summary."""

from __future__ import annotations

import base64
import json
from typing import Any
from xml.etree import ElementTree as ET


def junit(report: dict[str, Any]) -> str:
    """One <testcase> per check; failures carry their message and evidence."""
    checks = report["checks"]
    suite = ET.Element(
        "testsuite",
        name="energydiag.check",
        tests=str(len(checks)),
        failures=str(sum(c["status"] == "failed" for c in checks)),
        skipped=str(sum(c["status"] == "skipped" for c in checks)),
    )
    for c in checks:
        case = ET.SubElement(
            suite, "testcase", classname=f"energydiag.check.{_name(report['run'])}", name=c["name"]
        )
        if c["status"] == "failed":
            ET.SubElement(
                case, "failure", message=c["message"], type="energydiag"
            ).text = json.dumps(c["evidence"], default=str)
        elif c["status"] == "skipped":
            ET.SubElement(case, "skipped", message=c["message"])
    ET.indent(suite)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"
    )


def github(report: dict[str, Any]) -> list[str]:
    """Workflow commands GitHub renders as annotations on the run."""

    def escape(text: str) -> str:
        return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    return [
        f"::error title=energydiag check {c['name']}::{escape(c['message'])}"
        for c in report["checks"]
        if c["status"] == "failed"
    ]


MARK = {"passed": "✅", "failed": "❌", "skipped": "⏭️"}


def markdown(report: dict[str, Any], png: bytes | None = None) -> str:
    """A GitHub job summary: the verdict, one table row per check (failures first), and the loss
    curve inlined when one was drawn."""
    verdict = "passed" if report["passed"] else "failed"
    rows = sorted(report["checks"], key=lambda c: c["status"] != "failed")
    lines = [
        f"## energydiag check: `{report['run']}` {MARK[verdict]} {verdict}",
        "",
        "| check | result | detail |",
        "| --- | --- | --- |",
        *(
            f"| {c['name']} | {MARK.get(c['status'], '')} {c['status']} | {_cell(c['message'])} |"
            for c in rows
        ),
    ]
    if png is not None:
        encoded = base64.b64encode(png).decode("ascii")
        lines += ["", f'<img alt="loss curve" src="data:image/png;base64,{encoded}">']
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _name(run: str) -> str:
    return run.rstrip("/").rsplit("/", 1)[-1].replace(".", "_") or "run"
