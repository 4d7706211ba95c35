"""Minimal reproducers for the classes of bad input in issue 14 that the fuzz suite does not pin
down by itself: half-written conversions, Ctrl-C at start-up, user code run by a log-only
command, and memory on allocation bombs."""

from __future__ import annotations

import importlib.abc
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from energydiag.cli import app

runner = CliRunner()


def test_a_failed_convert_leaves_the_existing_run_and_no_partial_folder(small_run, tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "a").mkdir(parents=True)
    good = first_model_state(small_run)
    torch.save(good, foreign / "a" / "ckpt-10.pt")
    (foreign / "a" / "ckpt-20.pt").write_bytes(b"\x80garbage")  # the conversion fails here
    out = tmp_path / "existing"
    shutil.copytree(small_run, out)
    before = sorted(p.name for p in out.rglob("*"))
    args = ["convert", str(foreign), "--checkpoints", "a/ckpt-{step}.pt", "--out", str(out)]
    args += ["--model", "energydiag.reference.models:EnergyModel", "--overwrite"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "ckpt-20.pt" in result.stderr
    assert sorted(p.name for p in out.rglob("*")) == before  # the healthy run survives
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def first_model_state(run_dir: Path) -> dict:
    from energydiag.io.rundir import Run

    return Run(run_dir).checkpoint(0).model


class _Interrupt(importlib.abc.MetaPathFinder):
    """Ctrl-C arriving while the command line is still importing."""

    def find_spec(self, name, path=None, target=None):
        if name == "energydiag.cli.base":
            raise KeyboardInterrupt
        return None


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    import energydiag.cli as cli

    monkeypatch.delitem(sys.modules, "energydiag.cli.base", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Interrupt(), *sys.meta_path])
    monkeypatch.setattr(sys, "argv", ["energydiag", "--help"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "energydiag: interrupted\n"


def test_curves_on_a_reference_run_builds_no_model(fixtures_dir, monkeypatch):
    import energydiag.analyses.run_curves as curves
    from energydiag.analyses.curve_sources import curve_report

    def refuse(*args, **kwargs):
        raise AssertionError("curves built the model")

    monkeypatch.setattr(curves, "build_model", refuse)
    report = curve_report(fixtures_dir / "stalled")
    assert report.bounds["energy_span"] == 1.0 and report.plateau_on == "chance"


def peak_mib(args: list[str]) -> float:
    code = (
        "import re, sys\n"
        f"sys.argv = ['energydiag', *{args!r}]\n"
        "from energydiag.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "status = open('/proc/self/status').read()\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', status).group(1)) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_allocation_bombs_stay_small(tmp_path):
    bomb = tmp_path / "bomb.safetensors"
    save_file({"w": torch.ones(4)}, str(bomb))
    data = bomb.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["w"].update(shape=[2**40], data_offsets=[0, 0])
    text = json.dumps(header).encode()
    bomb.write_bytes(len(text).to_bytes(8, "little") + text)
    view = tmp_path / "view.pt"
    torch.save({"w": torch.ones(1).expand(10**10)}, view)
    for path in (bomb, view):
        assert peak_mib(["inspect", str(path)]) < 4096, path
    assert re.search("refusing to materialise", runner.invoke(app, ["inspect", str(view)]).stderr)
