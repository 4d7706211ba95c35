"""Use energydiag's checks inside a project's own test suite.

from energydiag.testing import assert_run_healthy

def test_energy_training_is_healthy(tmp_path):
    train_for_a_few_steps(record_to=tmp_path / "run")
    assert_run_healthy(tmp_path / "run", min_loss_drop=0.02)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from energydiag.analyses.gate import CheckReport, check
from energydiag.io.check_config import CheckConfig
from energydiag.io.rundir import Run


def assert_run_healthy(
    run_dir: str | Path, steps: int | None = None, **thresholds: float
) -> CheckReport:
    """Run `energydiag check` on a run directory; raise AssertionError naming every failed check."""
    report = check(Run(run_dir), replace(CheckConfig(), **thresholds), steps=steps)
    if report.failed:
        lines = "\n".join(f"  {c.name}: {c.message}" for c in report.failed)
        raise AssertionError(f"energydiag check failed for {run_dir}:\n{lines}")
    return report
