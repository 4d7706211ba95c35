"""`diff --against compile` (issue 23, Done-when case 3): under torch.compile both sides are
fingerprinted at module outputs and gradients by hooks that dynamo traces into the graph (a
dispatch mode would make the compiled side run eager), paired by module path and occurrence."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES
from typer.testing import CliRunner

from energydiag.cli import app
from energydiag.reference import models

pytestmark = pytest.mark.heavy

STEP = 40  # a checkpoint of the healthy fixture
runner = CliRunner()


def diff(*against: str) -> tuple[int, dict]:
    args = ["diff", str(FIXTURES / "healthy"), "--step", str(STEP), "--against", *against]
    result = runner.invoke(app, [*args, "--json"])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}


def modules_and_grads(report: dict) -> set[str]:
    return {m["module"] for m in report["modules"]}


def test_inductor_on_the_cpu_agrees_with_eager_within_its_tolerance():
    """Inductor fuses and reorders float32 sums; every module output and gradient stays within
    16 float32 epsilons of eager (dropout draws from eager's generator on both sides)."""
    code, report = diff("compile")
    assert code == 0 and report["level"] == "module"
    assert report["verdict"] in ("identical", "within tolerance")
    assert report["tolerance"] == pytest.approx(16 * torch.finfo(torch.float32).eps)
    # every module and every parameter's gradient paired, none left over
    forward = sum(1 for _ in models.EnergyModel(**_fixture_kwargs()).named_modules())
    grads = sum(1 for _ in models.EnergyModel(**_fixture_kwargs()).parameters())
    assert report["aligned"] == report["ops"][0] == report["ops"][1] >= forward - 1 + grads
    assert report["unmatched"] == [0, 0]
    assert {"attn", "pos_drop", "ctx_enc.0.fc1"} <= modules_and_grads(report)


def test_dynamo_without_a_compiler_is_bit_identical():
    """The eager backend runs dynamo's captured graph op for op: nothing may differ at all."""
    code, report = diff("compile=eager")
    assert code == 0 and report["verdict"] == "identical"
    assert all(m["largest"] == 0 for m in report["modules"])
    assert report["loss"][0] == report["loss"][1]


def test_a_range_past_the_checkpoint_watches_every_module_on_both_sides():
    """Steps 40 and 41 replay compiled before step 42 is watched: the hooks must be traced
    from the first compile (dynamo does not recompile for hooks added later), or the compiled
    side would pair its gradients only and call the rest identical."""
    args = ["diff", str(FIXTURES / "healthy"), "--steps", "42..43", "--against", "compile=eager"]
    result = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert result["unmatched"] == [0, 0] and result["ops"][0] == result["ops"][1] > 50
    assert result["steps"] == [42, 43] and result["verdict"] == "identical"


def test_a_block_that_computes_otherwise_when_compiled_is_named(monkeypatch):
    """A planted semantic change that only the compiled side traces: every residual block
    scales its output by 1 + 1e-3. The first one to finish is named, with its inputs matched,
    and its float64 re-run on each side's inputs says the compiled side is the one off."""
    plain = models.ResidualMLP.forward

    def planted(self, x):
        out = plain(self, x)
        return out * (1 + 1e-3) if torch.compiler.is_compiling() else out

    monkeypatch.setattr(models.ResidualMLP, "forward", planted)
    code, report = diff("compile=aot_eager")
    first = report["first_divergence"]
    assert code == 1 and report["verdict"] == "B is less accurate"
    assert (first["phase"], first["module"], first["op"]) == ("forward", "ctx_enc.0", "ResidualMLP")
    assert first["inputs_matched"] and first["differing_inputs"] == []
    assert first["relative"] == pytest.approx(1e-3, rel=0.05)
    assert first["shadow"]["error_b"] == pytest.approx(1e-3, rel=0.05)
    assert first["shadow"]["error_a"] < 1e-6


def test_an_unknown_backend_is_one_line():
    result = runner.invoke(app, ["diff", str(FIXTURES / "healthy"), "--against", "compile=nope"])
    assert result.exit_code == 2
    assert "no backend 'nope'" in result.output and "Traceback" not in result.output


def test_bitwise_is_refused_under_compile():
    result = runner.invoke(
        app, ["diff", str(FIXTURES / "healthy"), "--against", "compile", "--bitwise"]
    )
    assert result.exit_code == 2 and "within a tolerance" in result.output


def _fixture_kwargs() -> dict:
    manifest = json.loads((FIXTURES / "healthy" / "run.json").read_text())
    return manifest["model"]["kwargs"]
