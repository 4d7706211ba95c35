"""The package as a user gets it: a wheel built from this checkout, installed into a fresh venv
that borrows this environment's torch, pandas and friends (a path file, no download), and
``energydiag demo`` run from a folder outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(out: Path) -> Path:
    """From a copy of the source: setuptools builds in the project's build/, where two test
    workers building at once collide."""
    source = out / "source"
    skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "fixtures")
    shutil.copytree(ROOT, source, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)],
        check=True,
    )
    (wheel,) = out.glob("energydiag-*.whl")
    return wheel


def fresh_venv(folder: Path) -> Path:
    """Without ensurepip's copy of pip (seconds): ``pip_into`` installs with this one."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # This environment's packages, after the venv's own: the editable checkout is not on it.
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def pip_into(python: Path) -> list[str]:
    """This environment's pip, installing into another interpreter's environment."""
    return [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("dist"))


def test_wheel_holds_the_package_and_no_tests(wheel):
    wheel = zipfile.ZipFile(wheel)
    names = wheel.namelist()
    assert {"energydiag/reference/fixtures.py", "energydiag/cli/__init__.py"} <= set(names)
    assert not any(n.startswith(("tests/", "fixtures/", "benchmarks/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "energydiag = energydiag.cli:main" in wheel.read(entry).decode()


def test_an_interrupted_first_recording_leaves_no_half_fixtures(tmp_path, monkeypatch):
    from energydiag.reference import fixtures

    def half_then_fail(out, announce=None, progress=None):
        (out / "healthy").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(fixtures, "CHECKOUT", tmp_path / "no-checkout")
    monkeypatch.setattr(fixtures, "write_fixtures", half_then_fail)
    monkeypatch.setenv("ENERGYDIAG_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        fixtures.demo_runs("9.9")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.delenv("ENERGYDIAG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fixtures.cache_folder("9.9") == tmp_path / "xdg" / "energydiag" / "fixtures-9.9"


def test_demo_from_the_installed_wheel(wheel, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    subprocess.run([*pip_into(python), "--no-deps", "--no-index", str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "ENERGYDIAG_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    where = subprocess.run(
        [str(python), "-c", "import energydiag; print(energydiag.__file__)"],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert str(tmp_path / "venv") in where  # the wheel, not the checkout
    demo = [str(tmp_path / "venv" / "bin" / "energydiag"), "demo", "--json"]
    first = subprocess.run(demo, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "recording the demo runs" in first.stderr
    verdicts = {Path(r["run"]).name: r["verdict"] for r in json.loads(first.stdout)["runs"]}
    assert verdicts == {"healthy": "healthy", "nan": "non-finite", "stalled": "stalled"}
    assert all(
        Path(r["run"]).is_relative_to(tmp_path / "cache") for r in json.loads(first.stdout)["runs"]
    )
    second = subprocess.run(demo, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "recording" not in second.stderr  # cached
    assert json.loads(second.stdout) == json.loads(first.stdout)


OTHER_PYTHONS = [
    f"3.{minor}" for minor in (10, 12, 13) if f"3.{minor}" != sysconfig.get_python_version()
]


def find_python(version: str) -> Path | None:
    """pyenv's interpreter itself (its shims fail outside an activated shell), else PATH's."""
    pyenv = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python"))
    found = pyenv[-1] if pyenv else shutil.which(f"python{version}")
    return Path(found) if found else None


@pytest.mark.parametrize("version", OTHER_PYTHONS)
def test_other_pythons_compile_and_start_the_cli(wheel, tmp_path, version):
    """torch wheels for these interpreters are not on this machine, so the check is what runs
    without torch: every module compiles, and the CLI's help and version start."""
    python = find_python(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine")
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    venv = tmp_path / "venv" / "bin"
    pip = pip_into(venv / "python")
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
    if subprocess.run([*pip, "typer", "rich"], capture_output=True).returncode != 0:
        pytest.skip(f"typer and rich do not install for Python {version} here")
    code = "import compileall, energydiag, pathlib, sys; sys.exit(not compileall.compile_dir(pathlib.Path(energydiag.__file__).parent, quiet=1))"
    subprocess.run([str(venv / "python"), "-c", code], check=True)
    shown = subprocess.run([str(venv / "energydiag"), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "replay" in shown.stdout, shown.stderr
    version_line = subprocess.run(
        [str(venv / "energydiag"), "--version"], capture_output=True, text=True
    )
    assert version_line.stdout.strip() == "energydiag 0.1.0", version_line.stderr
