import json
from xml.etree import ElementTree as ET

import pytest
from typer.testing import CliRunner

from energydiag.analyses.gate import check, evaluate
from energydiag.cli import app
from energydiag.errors import DiagError
from energydiag.io.check_config import CheckConfig, load_config
from energydiag.io.rundir import Run
from energydiag.testing import assert_run_healthy

runner = CliRunner()


def statuses(report):
    return {c.name: c.status for c in report.checks}


def test_healthy_passes(fixtures_dir):
    report = check(Run(fixtures_dir / "healthy"), CheckConfig(), steps=5)
    assert report.failed == []
    assert statuses(report)["replay_fidelity"] == "passed"


STALLED_FAILS = {
    "loss_decreases",
    "no_long_plateau",
    "logit_spread",
    "saturation",
    "retrieval_above_chance",  # a saturated head ranks at chance
    "contrastive_health",
    "curve_health",  # the logged loss plateaus at chance
}


def test_stalled_and_nan_fail_on_the_right_checks(fixtures_dir):
    stalled = statuses(check(Run(fixtures_dir / "stalled"), CheckConfig()))
    assert {k for k, v in stalled.items() if v == "failed"} == STALLED_FAILS
    nan = statuses(check(Run(fixtures_dir / "nan"), CheckConfig()))
    assert {k for k, v in nan.items() if v == "failed"} == {"no_nonfinite"}
    assert nan["logit_spread"] == "skipped"  # its latest checkpoint is already NaN


def test_junit_and_json_files_and_github_annotations(fixtures_dir, tmp_path):
    junit, report = tmp_path / "check.xml", tmp_path / "check.json"
    result = runner.invoke(
        app,
        [
            "check",
            str(fixtures_dir / "stalled"),
            "--junit",
            str(junit),
            "--json-out",
            str(report),
            "--github",
        ],
    )
    assert result.exit_code == 1
    suite = ET.parse(junit).getroot()
    failed = {
        case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None
    }
    assert failed == STALLED_FAILS
    assert suite.get("failures") == str(len(STALLED_FAILS))
    data = json.loads(report.read_text())
    assert data["passed"] is False
    annotations = [line for line in result.stdout.splitlines() if line.startswith("::error")]
    assert len(annotations) == len(STALLED_FAILS) and any("saturation" in a for a in annotations)


def test_check_json_prints_and_the_old_file_form_still_works(fixtures_dir, tmp_path):
    from energydiag.cli import legacy_check_json

    printed = runner.invoke(app, ["check", str(fixtures_dir / "healthy"), "--json"])
    assert printed.exit_code == 0 and json.loads(printed.stdout)["passed"] is True
    old = ["check", "RUN", "--json", "out.json"]
    assert legacy_check_json(old) == ["check", "RUN", "--json-out", "out.json"]
    assert legacy_check_json(["check", "RUN", "--json"]) == ["check", "RUN", "--json"]


def test_baseline_catches_an_injected_regression(fixtures_dir, tmp_path):
    healthy = check(Run(fixtures_dir / "healthy"), CheckConfig())
    baseline = healthy.to_dict()
    assert evaluate(healthy.measurements, CheckConfig(), baseline)[-1].status == "passed"
    worse = dict(healthy.measurements, logit_spread=healthy.measurements["logit_spread"] * 0.5)
    (result,) = [c for c in evaluate(worse, CheckConfig(), baseline) if c.name == "baseline"]
    assert result.status == "failed" and "logit_spread" in result.evidence
    # and through the CLI, against a stored report
    stored = tmp_path / "baseline.json"
    stored.write_text(json.dumps(baseline))
    assert (
        runner.invoke(
            app, ["check", str(fixtures_dir / "healthy"), "--baseline", str(stored)]
        ).exit_code
        == 0
    )
    better = dict(baseline, measurements=dict(baseline["measurements"], loss_end=0.5))
    stored.write_text(json.dumps(better))
    result = runner.invoke(app, ["check", str(fixtures_dir / "healthy"), "--baseline", str(stored)])
    assert result.exit_code == 1 and "loss_end" in result.stdout


def test_plateau_longer_than_w_steps(fixtures_dir):
    from dataclasses import replace

    report = check(Run(fixtures_dir / "stalled"), replace(CheckConfig(), max_plateau_steps=50))
    (result,) = [c for c in report.checks if c.name == "plateau_steps"]
    assert result.status == "failed" and result.evidence["plateau_steps"] == 79
    healthy = check(Run(fixtures_dir / "healthy"), replace(CheckConfig(), max_plateau_steps=50))
    assert statuses(healthy)["plateau_steps"] == "passed"


def test_thresholds_from_toml_and_pyproject(fixtures_dir, tmp_path):
    config = tmp_path / "energydiag.toml"
    config.write_text("[tool.energydiag.check]\nmin_loss_drop = 0.9\n")
    assert load_config(config).min_loss_drop == 0.9
    (tmp_path / "pyproject.toml").write_text("[tool.energydiag.check]\nmax_saturation = 0.1\n")
    assert load_config(None, tmp_path).max_saturation == 0.1
    result = runner.invoke(app, ["check", str(fixtures_dir / "healthy"), "--config", str(config)])
    assert result.exit_code == 1 and "loss_decreases" in result.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("min_loss_dorp = 1\n", "unknown check setting"),
        ("min_loss_drop = 'a'\n", "must be numbers"),
        ("min_loss_drop = \n", "not valid TOML"),
    ],
)
def test_bad_configuration_is_exit_2(fixtures_dir, tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(DiagError, match=message):
        load_config(config)
    result = runner.invoke(app, ["check", str(fixtures_dir / "healthy"), "--config", str(config)])
    assert result.exit_code == 2 and message in result.stderr


def test_pytest_helper(fixtures_dir):
    assert_run_healthy(fixtures_dir / "healthy")
    with pytest.raises(AssertionError, match="saturation"):
        assert_run_healthy(fixtures_dir / "stalled")


def test_github_job_summary_is_appended_with_the_curve(fixtures_dir, tmp_path, monkeypatch):
    import base64

    pytest.importorskip("matplotlib")
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    png = tmp_path / "curve.png"
    args = ["check", str(fixtures_dir / "stalled"), "--png", str(png), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and summary.read_text() == "earlier step\n"  # no --github
    checks = json.loads(result.stdout)["checks"]
    runner.invoke(app, [*args, "--github"])
    text = summary.read_text()
    assert text.startswith("earlier step\n## energydiag check:") and "❌ failed" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(checks) and "failed" in rows[0]
    encoded = text.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(encoded) == png.read_bytes()
