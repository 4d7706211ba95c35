import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from energydiag.analyses.curves import analyse
from energydiag.cli import app
from energydiag.contrastive.bounds import infonce_curve_bounds
from energydiag.errors import DiagError
from energydiag.io.metrics import choose_metric, load_metrics

runner = CliRunner()


def series(values):
    return pd.DataFrame({"step": np.arange(len(values)), "loss": values})


def test_plateau_spike_and_divergence_at_known_change_points():
    rng = np.random.default_rng(1)
    steps = np.arange(3000)
    y = np.where(steps < 800, 3 - 0.002 * steps, 1.4) + rng.normal(0, 0.004, steps.size)
    y[1500] += 0.8  # a spike
    y = np.where(steps >= 2400, 1.4 + 0.01 * (steps - 2400), y)  # divergence from 2400
    report = analyse(series(y), "loss")
    (plateau,) = report.plateaus
    assert plateau.start == pytest.approx(800, abs=60) and plateau.end == pytest.approx(
        2400, abs=60
    )
    assert [s["step"] for s in report.spikes] == [1500]
    assert report.divergence.start == pytest.approx(2400, abs=120)
    codes = {f.code for f in report.findings}
    assert {"curve.plateau", "curve.spikes", "curve.divergence"} <= codes


def test_a_long_log_is_shaped_on_block_medians_and_keeps_its_spike(tmp_path):
    """600,000 points (blocks of 3): the same change points as the exact analysis finds on the
    short series above, the one-point spike at its own step, read back from a CSV."""
    rng = np.random.default_rng(1)
    steps = np.arange(600_000)
    y = np.where(steps < 160_000, 3 - 1e-5 * steps, 1.4) + rng.normal(0, 0.004, steps.size)
    y[300_001] += 0.8
    y = np.where(steps >= 480_000, 1.4 + 5e-5 * (steps - 480_000), y)
    path = tmp_path / "long.csv"
    series(y).to_csv(path, index=False)
    report = analyse(load_metrics(path), "loss")
    (plateau,) = report.plateaus
    assert plateau.start == pytest.approx(160_000, abs=12_000)
    assert plateau.end == pytest.approx(480_000, abs=12_000)
    assert [s["step"] for s in report.spikes] == [300_001]
    assert report.divergence.start == pytest.approx(480_000, abs=24_000)
    assert report.points == 600_000 and len(report.display["step"]) == 2000


def test_noisy_descent_has_no_plateau_or_spike():
    rng = np.random.default_rng(2)
    y = 3 * np.exp(-np.arange(2000) / 400) + 0.5 + rng.normal(0, 0.02, 2000)
    report = analyse(series(y), "loss")
    assert report.plateaus == [] and report.spikes == [] and report.divergence is None
    assert report.unstable is None


def test_exactly_constant_stretch_and_first_nonfinite(tmp_path):
    y = np.linspace(2, 1, 300)
    y[100:160] = 1.6667
    y[250] = math.nan
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": i, "loss": float(v)}) + "\n" for i, v in enumerate(y))
    )
    report = analyse(load_metrics(path), "loss")
    (const,) = report.constant
    assert (const.start, const.end) == (100, 159)
    assert report.first_nonfinite == 250
    assert report.findings[0].code in ("curve.nonfinite", "curve.constant")


def test_oscillation():
    rng = np.random.default_rng(3)
    y = 1 + 0.1 * (-1.0) ** np.arange(1000) + rng.normal(0, 0.01, 1000)
    report = analyse(series(y), "loss")
    assert report.oscillations and report.oscillations[0].start == 0


def test_stalled_fixture_sits_on_the_bound_its_configuration_implies(fixtures_dir):
    result = runner.invoke(app, ["curves", str(fixtures_dir / "stalled"), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    b = 8
    assert report["bounds"]["chance"] == pytest.approx(math.log(b))
    assert report["bounds"]["floor"] == pytest.approx(
        math.log(1 + (b - 1) * math.exp(-1 / 0.5)), rel=1e-5
    )
    assert report["plateau_on"] == "chance"
    assert report["plateaus"][0]["start"] == 0 and report["plateaus"][0]["end"] == 79
    assert report["findings"][0]["code"] == "curve.plateau_at_chance"


def test_plateau_at_floor_is_told_apart():
    bounds = infonce_curve_bounds(8, 0.5, 1.0)
    y = np.concatenate([np.linspace(2.0, bounds["floor"], 200), np.full(400, bounds["floor"])])
    y = y + np.random.default_rng(4).normal(0, 1e-4, y.size)
    report = analyse(series(y), "loss", bounds=bounds)
    assert report.plateau_on == "floor"
    assert report.findings[0].code == "curve.plateau_at_floor"


def test_wandb_csv_columns_and_companions(tmp_path):
    path = tmp_path / "wandb.csv"
    frame = pd.DataFrame(
        {
            "Step": [0, 10, 20],
            "VLA Train/Energy Loss": [2.0, 1.9, 1.8],
            "VLA Train/Energy Loss__MIN": [1.9, 1.8, 1.7],
            "VLA Train/Positive Energy": [0.5, 0.4, 0.4],
        }
    )
    frame.to_csv(path, index=False)
    loaded = load_metrics(path)
    assert list(loaded["step"]) == [0, 10, 20]
    assert "VLA Train/Energy Loss__MIN" not in loaded
    assert choose_metric(loaded, None, path) == "VLA Train/Energy Loss"
    assert choose_metric(loaded, "positive", path) == "VLA Train/Positive Energy"
    with pytest.raises(DiagError, match="matches several"):
        choose_metric(loaded, "energy", path)


def test_unlogged_cells_are_not_non_finite(tmp_path):
    """A W&B export has empty cells where a metric was not logged; a logged NaN is text."""
    path = tmp_path / "export.csv"
    rows = ["Step,VLA Train/Energy Loss,VLA Train/Grad"] + [
        f"{10 * i},{2 - i / 100}," for i in range(60)
    ]
    rows += [f"{600 + 10 * i},,{i}" for i in range(5)]
    path.write_text("\n".join(rows) + "\n")
    assert analyse(load_metrics(path), "VLA Train/Energy Loss").first_nonfinite is None
    path.write_text("\n".join([*rows, "700,NaN,"]) + "\n")
    assert analyse(load_metrics(path), "VLA Train/Energy Loss").first_nonfinite == 700


def test_bad_metric_files(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("a,b\n1,2\n")
    result = runner.invoke(app, ["curves", str(path)])
    assert result.exit_code == 2 and "no step column" in result.stderr
    result = runner.invoke(app, ["curves", str(tmp_path / "missing.csv")])
    assert result.exit_code == 2 and "file not found" in result.stderr


def test_png_is_written(fixtures_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curve.png"
    result = runner.invoke(app, ["curves", str(fixtures_dir / "stalled"), "--png", str(out)])
    assert result.exit_code == 1 and out.read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in range(100):
        writer.add_scalar("train/energy_loss", math.log(8) if step < 80 else math.nan, step)
    writer.close()
    frame = load_metrics(tmp_path)
    report = analyse(frame, choose_metric(frame, None, tmp_path))
    assert report.first_nonfinite == 80
    assert (report.plateaus[0].start, report.plateaus[0].end) == (0, 79)


def test_a_loss_that_turns_erratic_after_an_lr_event():
    """A W&B export, one point every 10 steps: flat near chance, then finite but erratic."""
    values = [
        2.0815,
        2.0811,
        2.0807,
        2.0805,
        2.0778,
        2.0794,
        2.45,
        2.12,
        2.73,
        2.26,
        2.03,
        2.61,
        2.08,
    ]
    frame = pd.DataFrame({"step": np.arange(0, 130, 10), "loss": values})
    report = analyse(frame, "loss")
    assert report.unstable.start == 50 and report.unstable.level > 100
    assert "curve.unstable" in [f.code for f in report.findings]
    one_spike = [2.08] * 10 + [2.6, 2.08, 2.08]
    quiet = analyse(pd.DataFrame({"step": np.arange(13), "loss": one_spike}), "loss")
    assert quiet.unstable is None  # one late spike is not a regime change


def test_a_column_first_logged_after_the_first_block_still_reads(tmp_path):
    """The streaming reader types a column from its first 4 MiB; a metric logged only later
    (empty there) sends the file to the whole-file reader, which still tells a missing cell
    from a logged NaN."""
    n = 300_000
    steps = np.arange(n)
    late = np.where(steps >= 250_000, steps * 0.25, np.nan)
    frame = pd.DataFrame({"step": steps, "loss": 2 - steps / n, "late": late})
    path = tmp_path / "late.csv"
    frame.to_csv(path, index=False, na_rep="")
    assert path.stat().st_size > 4 << 20
    with path.open("a") as out:
        out.write(f"{n},NaN,\n")
    loaded = load_metrics(path)
    assert loaded["late"].notna().sum() == 50_000 and float(loaded["late"].iloc[-2]) == (n - 1) / 4
    assert analyse(loaded, "loss").first_nonfinite == n
    assert analyse(loaded, "late").first_nonfinite is None


def test_curves_on_a_log_file_reads_and_judges_it_without_torch(tmp_path):
    """The offline monitors, the energy ones included, run on a log without importing torch
    (220 MiB of a ten-million-row log's memory budget)."""
    import subprocess
    import sys

    steps = np.arange(200)
    saturation = np.where(steps >= 50, 0.95, 0.2)
    log = pd.DataFrame({"step": steps, "loss": 2 - steps / 400, "saturation": saturation})
    path = tmp_path / "metrics.csv"
    log.to_csv(path, index=False)
    code = (
        "import json, sys\n"
        f"sys.argv = ['energydiag', 'curves', {str(path)!r}, '--json']\n"
        "from energydiag.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    text, verdict = out.stdout.rsplit("\n", 2)[0], out.stdout.strip().splitlines()[-1]
    assert verdict == "no torch", out.stderr
    alarms = {a["rule"]: a["step"] for a in json.loads(text)["alarms"]}
    assert alarms["saturation"] == 52  # three checks at >= 90%, from step 50
