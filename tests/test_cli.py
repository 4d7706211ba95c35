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
    import energydiag.commands.diagnose

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(energydiag.commands.diagnose, "diagnose", broken)
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


def test_shell_completion_offers_commands_and_options():
    """What `energydiag --install-completion` installs: the shell asks the program itself."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("energydiag")
    env = {**os.environ, "_ENERGYDIAG_COMPLETE": "complete_bash", "COMP_CWORD": "1"}
    words = subprocess.run(
        [str(exe)], env={**env, "COMP_WORDS": "energydiag rep"}, capture_output=True, text=True
    ).stdout.split()
    assert words == ["replay", "report"]
    env["COMP_CWORD"] = "2"
    options = subprocess.run(
        [str(exe)],
        env={**env, "COMP_WORDS": "energydiag report --"},
        capture_output=True,
        text=True,
    ).stdout.split()
    assert {"--out", "--force", "--json"} <= set(options)
