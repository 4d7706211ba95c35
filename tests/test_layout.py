"""The architecture, checked: folders are layers, imports only go downward, and the command
line starts without torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "energydiag"
# Lower layers first; a module may import its own layer and the ones before it.
LAYERS = [
    "errors",
    "schema",
    "exitcodes",
    "io",
    "engine",
    "record",
    "reference",
    "contrastive",
    "findings",
    "analyses",
    "commands",
    "report",
    "testing",
    "cli",
]


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("energydiag.")
        ):
            found.add(node.module)
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("energydiag.")}
    return found


def test_imports_only_go_downward():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = "energydiag." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        here = layer_of(module)
        if here == "__init__":
            continue
        for target in imports_of(path):
            there = layer_of(target)
            if LAYERS.index(there) > LAYERS.index(here):
                upward.append(f"{module} -> {target}")
    assert upward == []


STRING_IMPORT = re.compile(r"energydiag\.([a-z_]+)[a-z_.]*:")


def string_imports(path: Path) -> set[str]:
    """The layers that import strings ('energydiag.reference.losses:margin') name: a plug-in
    resolved at run time is a dependency too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= set(STRING_IMPORT.findall(node.value))
    return found


def test_import_strings_go_downward_except_through_the_plugin_registry():
    """Only ``engine.registry`` may name a higher layer, and only in its registries (the
    built-in losses, the energy models' live monitors), whose every entry must resolve."""
    import pkgutil

    from energydiag.engine.registry import BUILTIN_LOSSES, LIVE_ENERGY

    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = "energydiag." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module == "energydiag.engine.registry" or layer_of(module) == "__init__":
            continue
        here = LAYERS.index(layer_of(module))
        upward += [f"{module} -> {t}" for t in string_imports(path) if LAYERS.index(t) > here]
    assert upward == []
    targets = [*BUILTIN_LOSSES.values(), *LIVE_ENERGY.values()]
    assert all(callable(pkgutil.resolve_name(t)) for t in targets)
    registry = PACKAGE / "engine" / "registry.py"
    assert string_imports(registry) == {"reference", "contrastive"}


def test_modules_and_functions_stay_small():
    big_modules, long_functions = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 400:
            big_modules.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{path.name}:{node.name}")
    assert big_modules == [] and long_functions == []


def test_the_command_line_starts_without_torch_or_pandas():
    code = "import sys, energydiag.cli; print(sorted({'torch', 'pandas'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
