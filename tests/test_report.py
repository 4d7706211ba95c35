"""`energydiag report` (issue 16): one self-contained HTML page drawn from the overview JSON.
The page is parsed: every section is there, every image is an inlined PNG, nothing is fetched,
and what it says agrees with the JSON."""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from energydiag.cli import app
from energydiag.report.html import SECTIONS

runner = CliRunner()
pytest.importorskip("matplotlib")


class Page(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, list[str]] = {}
        self.images: dict[str, list[str]] = {}
        self.links: list[str] = []
        self._section: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section], self.images[self._section] = [], []
        if tag == "img":
            self.images[self._section].append(attrs["src"])
        self.links += [v for k, v in attrs.items() if k in ("href", "src") and v]

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._section:
            self.sections[self._section].append(data)

    def text(self, section: str) -> str:
        return " ".join(self.sections[section])


def make_report(run, out, *extra):
    result = runner.invoke(app, ["report", str(run), "-o", str(out), *extra])
    return result, Page(out.read_text()) if out.exists() else None


def assert_png(src: str) -> None:
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_run_page_has_every_section_and_the_fault(fixtures_dir, tmp_path):
    result, page = make_report(fixtures_dir / "nan", tmp_path / "report.html")
    assert result.exit_code == 1, result.output  # the run is not healthy
    assert list(page.sections) == list(SECTIONS)
    assert all(link.startswith("data:image/png;base64,") for link in page.links)  # no network
    for section in ("loss-curve", "energy-matrix", "layers", "saturation"):
        (src,) = page.images[section]
        assert_png(src)
    fault = page.text("fault")
    assert "57" in fault and "aten::_softmax" in fault and "attn" in fault
    assert "non-finite" in page.text("summary")
    assert "nonfinite.forward" in page.text("findings")
    findings = " ".join(page.text("findings").split())
    assert "run: energydiag bisect RUN --predicate nonfinite" in findings


def test_page_agrees_with_the_json(fixtures_dir, tmp_path):
    data = json.loads(
        runner.invoke(app, ["report", str(fixtures_dir / "stalled"), "--json"]).stdout
    )
    assert set(data) >= {"diagnosis", "curves", "timeline", "inspect"} and data["notes"] == []
    assert len(data["inspect"]["batch"]["energy_matrix"]) == 8  # B = 8, the whole matrix
    _, page = make_report(fixtures_dir / "stalled", tmp_path / "report.html")
    for finding in data["diagnosis"]["findings"]:
        assert finding["code"] in page.text("findings")
    assert "Not available" in page.text("fault")  # stalled, not NaN: said, not dropped
    saturated = [r for r in data["inspect"]["batch"]["saturation"] if r["fraction"] > 0.99]
    assert saturated and "sigmoid" in saturated[0]["op"]


def test_missing_parts_are_named_not_dropped(fixtures_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fixtures_dir / "healthy", run)
    (run / "metrics.jsonl").unlink()
    shutil.rmtree(run / "batches")
    result, page = make_report(run, tmp_path / "report.html")
    assert list(page.sections) == list(SECTIONS)
    assert "Not available" in page.text("loss-curve")
    assert "Not available" in page.text("energy-matrix")
    assert page.images["layers"]  # the checkpoints are still there


def test_an_existing_page_is_not_overwritten(fixtures_dir, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("keep me")
    result = runner.invoke(app, ["report", str(fixtures_dir / "healthy"), "-o", str(out)])
    assert result.exit_code == 2 and "--force" in result.stderr and out.read_text() == "keep me"
    result = runner.invoke(app, ["report", str(fixtures_dir / "healthy")])
    assert result.exit_code == 2 and "--out" in result.stderr
    result, page = make_report(fixtures_dir / "healthy", out, "--force")
    assert result.exit_code == 0 and "healthy" in page.text("summary")


def test_the_fault_card_never_denies_a_non_finite_step_the_curve_marks():
    from energydiag.report.html import _fault

    unlocalised = {"diagnosis": {"fault": None}, "curves": {"first_nonfinite": 12}}
    assert "the log goes non-finite at step 12" in _fault(unlocalised, None)
    clean = {"diagnosis": {"fault": None}, "curves": {"first_nonfinite": None}}
    assert "no step went non-finite" in _fault(clean, None)
