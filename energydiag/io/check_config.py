"""Thresholds for `energydiag check`: documented defaults, overridable from TOML.

Read from ``--config FILE`` (a table [tool.energydiag.check], [check], or top-level keys) or,
without one, from [tool.energydiag.check] in ./pyproject.toml when present.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from energydiag.errors import DiagError


@dataclass(frozen=True)
class CheckConfig:
    min_loss_drop: float = 0.05  # relative drop, first 10% of the log to the last 10%
    max_plateau_fraction: float = 0.25  # longest plateau / logged steps
    max_plateau_steps: float = math.inf  # longest plateau in training steps (inf: off)
    min_logit_spread: float = 1.0  # max - min of -E/tau over the in-batch matrix
    min_energy_span: float = 0.0  # max - min of E (0 disables)
    max_saturation: float = 0.5  # fraction of sigmoid/tanh/softplus outputs at their limits
    min_grad_norm: float = 1e-8  # logged global gradient norm, smallest allowed
    max_grad_norm: float = 1e3  # ... and largest allowed
    max_replay_deviation: float = 1e-4  # |replayed - logged loss| with --steps
    max_weight_growth: float = 1e3  # a layer's max|w|, latest checkpoint over the first
    baseline_tolerance: float = 0.1  # relative regression allowed against --baseline


def load_config(path: Path | None, search: Path = Path(".")) -> CheckConfig:
    if path is None:
        pyproject = search / "pyproject.toml"
        if not pyproject.is_file():
            return CheckConfig()
        table = _read(pyproject).get("tool", {}).get("energydiag", {}).get("check", {})
        return _apply(CheckConfig(), table, pyproject)
    raw = _read(path)
    table = raw.get("tool", {}).get("energydiag", {}).get("check") or raw.get("check") or raw
    return _apply(CheckConfig(), table, path)


def _read(path: Path) -> dict:
    """TOML is parsed here, not at import: `check --help` lists the keys above without it."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib

    if not path.is_file():
        raise DiagError(path, "file not found")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DiagError(path, f"not valid TOML ({err})") from None


def _apply(config: CheckConfig, table: dict, source: Path) -> CheckConfig:
    known = {f.name for f in fields(CheckConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise DiagError(
            source,
            f"unknown check setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})",
        )
    bad = [k for k, v in table.items() if not isinstance(v, int | float) or isinstance(v, bool)]
    if bad:
        raise DiagError(source, f"check setting(s) {', '.join(bad)} must be numbers")
    return replace(config, **{k: float(v) for k, v in table.items()})
