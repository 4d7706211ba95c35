"""The command line's contract with its users: `--help` as Click users expect it, options named
once, and every option a message or a remedy mentions spelled as a flag that exists."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from energydiag.cli import app
from energydiag.cli.options import flag
from energydiag.cli.table import COMMANDS
from energydiag.errors import OptionError
from energydiag.io.check_config import CheckConfig

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parent.parent / "energydiag"
README = Path(__file__).resolve().parent.parent / "README.md"


def _click():
    return typer.main.get_command(app)


def _flags(command: str) -> set[str]:
    params = _click().commands[command].params  # Typer's own copy of Click: no isinstance
    return {o for p in params if p.param_type_name == "option" for o in p.opts}


def test_commands_are_listed_in_the_readme_order_with_whole_summaries():
    result = runner.invoke(app, ["--help"])
    listed = re.findall(r"^  (\w+)\s{2,}(.+)$", result.stdout.split("Commands:")[1], re.M)
    readme = README.read_text().split("| command | what it answers |")[1].split("\n\n")[0]
    table = re.findall(r"^\| `(\w+)[^`]*` \|", readme, re.M)
    assert [name for name, _ in listed] == table == [name for name, _, _ in COMMANDS]
    assert all(not summary.endswith("...") for _, summary in listed)


def test_help_shows_placeholders_not_python_types():
    for name, _, _ in COMMANDS:
        text = runner.invoke(app, [name, "--help"]).stdout
        assert not re.search(r"<\w+(\[\w+\])?>", text), (name, text)
        assert "{" not in text.splitlines()[0], text  # the usage line
    usage = {
        name: runner.invoke(app, [name, "--help"]).stdout.splitlines()[0]
        for name in ("inspect", "replay", "curves")
    }
    assert usage == {
        "inspect": "Usage: energydiag inspect [OPTIONS] CKPT",
        "replay": "Usage: energydiag replay [OPTIONS] [RUN]",
        "curves": "Usage: energydiag curves [OPTIONS] LOG",
    }


def test_check_help_lists_every_threshold_key():
    text = " ".join(runner.invoke(app, ["check", "--help"]).stdout.split())
    for key in (f.name for f in dataclasses.fields(CheckConfig)):
        assert key in text


def _option_names() -> set[str]:
    """Every option name passed to OptionError or an Invocation anywhere in the package."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            callee = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if callee == "OptionError":
                names |= {a.value for a in node.args[1:] if isinstance(a, ast.Constant)}
            if callee == "Invocation":
                names |= _invocation_options(node)
    return names


def _invocation_options(node: ast.Call) -> set[str]:
    options = [k.value for k in node.keywords if k.arg == "options"] + node.args[2:3]
    return {k.value for o in options if isinstance(o, ast.Dict) for k in o.keys}


def test_every_option_named_below_the_cli_is_a_real_flag():
    every_flag = set().union(*(_flags(name) for name, _, _ in COMMANDS))
    names = _option_names()
    assert len(names) > 20  # the scan found the package's errors and remedies
    assert {n: flag(n) for n in names if flag(n) not in every_flag} == {}


def _docstrings(tree: ast.AST) -> set[int]:
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, owners) and node.body and isinstance(node.body[0], ast.Expr)
    }


def test_no_flag_is_spelled_below_the_cli():
    """Messages, notes and remedies name options by argument name; only docstrings (for the
    reader of the code) may mention a command line."""
    spelled = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "cli":
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docs
            ):
                spelled += [f"{path.name}: {m}" for m in re.findall(r"--[a-z][a-z-]+", node.value)]
    assert spelled == []


def test_option_errors_read_as_arguments_in_python_and_as_flags_on_the_command_line(fixtures_dir):
    err = OptionError("is before the first step 3", "to_step", value=1)
    assert str(err) == "to_step 1: is before the first step 3"
    assert err.render(flag) == "--to-step 1: is before the first step 3"
    missing = OptionError("needs a model", "model", "run_dir", path="x.safetensors")
    assert missing.render(flag) == "x.safetensors: needs a model (--model or --run)"
    result = runner.invoke(app, ["replay", str(fixtures_dir / "nan"), "--every", "-1"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "energydiag: error: --every -1: use 0 (cheap check only) or a positive step count"
    )
