from typer.testing import CliRunner

from energydiag import __version__
from energydiag.cli import app

runner = CliRunner()


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"energydiag {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in (
        "replay",
        "inspect",
        "bisect",
        "convert",
        "curves",
        "whatif",
        "check",
        "diagnose",
        "demo",
    ):
        assert command in result.stdout


def test_a_bug_of_ours_is_one_line_and_exit_3(fixtures_dir, monkeypatch):
    import energydiag.analyses.diagnosis

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(energydiag.analyses.diagnosis, "diagnose", broken)
    monkeypatch.delenv("ENERGYDIAG_DEBUG", raising=False)
    result = runner.invoke(app, ["diagnose", str(fixtures_dir / "healthy")])
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines() == [
        "energydiag: internal error: ZeroDivisionError: boom (ENERGYDIAG_DEBUG=1 shows the traceback; please report it)"
    ]


def test_demo_runs_on_the_fixtures(fixtures_dir):
    result = runner.invoke(app, ["demo", "--fixtures", str(fixtures_dir), "--json"])
    assert result.exit_code == 0
    import json

    verdicts = {
        r["run"].rsplit("/", 1)[-1]: r["verdict"] for r in json.loads(result.stdout)["runs"]
    }
    assert verdicts == {"healthy": "healthy", "stalled": "stalled", "nan": "non-finite"}
