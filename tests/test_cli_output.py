"""What a person sees: every command's human-readable output, rendered on the fixtures."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from energydiag.cli import app

runner = CliRunner()


def show(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout


def test_replay_shows_the_fault_and_the_fidelity(fixtures_dir):
    code, text = show("replay", fixtures_dir / "nan", "--from-step", "40")
    assert code == 1
    for line in ("First non-finite value", "phase: forward", "module: attn", "aten::_softmax"):
        assert line in text
    assert "fidelity" in text and "Last steps" in text and "remedy:" in text


def test_inspect_shows_bounds_saturation_and_activations(fixtures_dir):
    ckpt = fixtures_dir / "stalled" / "checkpoints" / "step-00000060.safetensors"
    code, text = show("inspect", ckpt)
    assert code == 1
    for line in (
        "Energy model on the batch of step 60",
        "tau=0.5 from the run's loss",
        "head bounds",
        "aten::sigmoid in 'head_out'",
        "loss bounds (head)",
        "Saturation",
        "Activations in execution order",
        "ERROR",
    ):
        assert line in text, line


def test_bisect_shows_evaluations_and_the_step(fixtures_dir):
    code, text = show("bisect", fixtures_dir / "nan")
    assert code == 1
    assert "Checkpoint evaluations (predicate: any)" in text
    assert "first bad step" in text and "57" in text and "First non-finite value" in text


def test_curves_shows_the_sparkline_bounds_and_plateau(fixtures_dir):
    code, text = show("curves", fixtures_dir / "stalled")
    assert code == 1
    assert any(ch in text for ch in "▁▂▃▄▅▆▇█")
    assert "bounds: chance log(8)" in text and "plateau" in text


def test_whatif_through_the_cli(fixtures_dir):
    code, text = show(
        "whatif", fixtures_dir / "stalled", "--from-step", "40", "--steps", "6",
        "--try", "tau=0.1", "--try", "head=softplus",
    )  # fmt: skip
    assert code == 0
    assert "What-if: 6 logged steps from checkpoint 40" in text
    assert "head=softplus" in text and "tau=0.1" in text and "baseline" in text


def test_check_and_diagnose_and_demo(fixtures_dir):
    code, text = show("check", fixtures_dir / "healthy")
    assert code == 0 and "all checks passed" in text and "replay_fidelity" in text
    code, text = show("diagnose", fixtures_dir / "nan")
    assert code == 1 and "non-finite" in text and "step 57" in text
    code, text = show("demo", "--fixtures", fixtures_dir)
    assert code == 0
    assert all(name in text for name in ("healthy", "stalled", "nan"))


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version(flag):
    code, text = show(flag)
    assert code == 0 and ("energydiag" in text)
