"""Typed reports: every command's JSON reads back into its type and writes the same JSON again;
the schema itself refuses what does not fit."""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from energydiag import schema
from energydiag.cli import app
from energydiag.engine.localise import Fault
from energydiag.engine.observers import OpEvent
from energydiag.engine.tensorstats import TensorSummary
from energydiag.report.jsonout import dumps

runner = CliRunner()


def setup_module() -> None:
    """Every command module, so that every report type is registered before a test reads one."""
    import energydiag.commands

    for module in pkgutil.iter_modules(energydiag.commands.__path__):
        importlib.import_module(f"energydiag.commands.{module.name}")


@dataclass
class Inner(schema.Record):
    x: float
    tags: list[str] = field(default_factory=list)


@dataclass
class Outer(schema.Record):
    derived = ("doubled",)
    flattened = ("inner",)

    inner: Inner
    span: tuple[int, int] | None = None
    maybe: Inner | None = None
    table: dict[str, list[float | None]] = field(default_factory=dict)

    @property
    def doubled(self) -> float:
        return 2 * self.inner.x


def test_records_round_trip_through_strict_json():
    value = Outer(Inner(math.nan, ["a"]), (3, 4), Inner(math.inf), {"w": [1.0, None, -math.inf]})
    text = dumps(value.to_dict())
    data = json.loads(text)
    assert data["x"] == "NaN" and data["doubled"] == "NaN" and "inner" not in data  # flattened
    back = Outer.from_dict(data)
    assert back.span == (3, 4) and math.isinf(back.maybe.x) and back.inner.tags == ["a"]
    assert back.table["w"][1] is None and back.table["w"][2] == -math.inf
    assert dumps(back.to_dict()) == text


def test_json_that_does_not_fit_is_refused():
    with pytest.raises(schema.SchemaError, match="missing"):
        Inner.from_dict({"tags": []})
    with pytest.raises(schema.SchemaError, match="expected a number"):
        Inner.from_dict({"x": "many"})
    with pytest.raises(schema.SchemaError, match="unknown report type"):
        schema.load({"type": "nope"})
    with pytest.raises(schema.SchemaError, match="expected a 'diagnose' report"):
        schema.REPORTS["diagnose"].from_json({"type": "timeline"})


def test_a_report_tag_registered_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):

        @schema.report("diagnose")
        @dataclass
        class Another(schema.Report):
            pass


def test_a_fault_keeps_its_op_through_json():
    summary = TensorSummary([2, 3], nan=1, finite_count=5, min=-1.0, max=2.0)
    op = OpEvent(7, "aten::div", "norm", "forward", 0, "nan", [summary], summary)
    fault = Fault(5, "forward", "NaN in norm", module="norm", op=op, rank=1)
    back = Fault.from_dict(json.loads(dumps(fault.to_dict())))
    assert isinstance(back.op, OpEvent) and isinstance(back.op.output, TensorSummary)
    assert back.op.op == "aten::div" and back.op.inputs[0].nan == 1 and back.rank == 1


def _foreign(tmp: Path, fixtures: Path) -> Path:
    """Two torch.save'd state dicts of the healthy fixture, as another tool would leave them."""
    folder = tmp / "foreign"
    folder.mkdir()
    for step in (0, 20):
        tensors = load_file(fixtures / "healthy" / "checkpoints" / f"step-{step:08d}.safetensors")
        model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        torch.save(model, folder / f"ckpt-{step}.pt")
    return folder


def _only(fixtures: Path, name: str, tmp: Path) -> Path:
    """A fixtures folder with one run: the demo's report type, without diagnosing all three."""
    folder = tmp / "one"
    folder.mkdir()
    (folder / name).symlink_to(fixtures / name)
    return folder


def _commands(fixtures: Path, tmp: Path) -> dict[str, list[str]]:
    healthy, nan = fixtures / "healthy", fixtures / "nan"
    kwargs = json.loads((healthy / "run.json").read_text())["model"]["kwargs"]
    ckpt = str(healthy / "checkpoints" / "step-00000100.safetensors")
    return {
        "demo": ["demo", "--fixtures", str(_only(fixtures, "stalled", tmp))],
        "diagnose": ["diagnose", str(nan)],
        "replay": ["replay", str(nan), "--from-step", "0", "--to-step", "6"],
        "bisect": ["bisect", str(nan)],
        "timeline": ["timeline", str(nan)],
        "inspect": ["inspect", ckpt],
        "curves": ["curves", str(fixtures / "stalled")],
        "whatif": ["whatif", str(healthy), "--from-step", "100", "--steps", "2", "--try", "tau=1"],
        "check": ["check", str(healthy)],
        "landscape": ["landscape", ckpt, "--steps", "3"],
        "report": ["report", str(healthy)],
        "diff": ["diff", str(healthy), "--step", "40", "--against", "threads=1"],
        "convert": [
            "convert",
            str(_foreign(tmp, fixtures)),
            "--checkpoints",
            "ckpt-{step}.pt",
            "--out",
            str(tmp / "converted"),
            "--model",
            "energydiag.reference.models:EnergyModel",
            "--model-kwargs",
            json.dumps(kwargs),
        ],
    }


def test_every_command_prints_a_typed_report_that_round_trips(fixtures_dir, tmp_path):
    """What `--json` prints is a tagged report that reads back into its type and, written again,
    is the same text: no command's JSON is assembled by hand."""
    commands = _commands(fixtures_dir, tmp_path)
    registered = {c.name for c in app.registered_commands}
    assert registered == set(commands), "a command without a round-trip case"
    for kind, argv in commands.items():
        result = runner.invoke(app, [*argv, "--json"])
        assert result.exit_code in (0, 1), (kind, result.stderr)
        data = json.loads(result.stdout)
        assert data["type"] == kind
        report = schema.load(data)
        assert type(report) is schema.REPORTS[kind]
        assert dumps(report.to_json()) == result.stdout.strip(), kind
