"""Curve analysis of a 10-million-row metrics log: time and peak memory.

    python benchmarks/bench_curves.py [--rows 10000000]

Writes a CSV (a descent, a plateau, a spike, a divergence), then in fresh subprocesses reads it
and analyses it as ``curves`` does (the curve, then the live monitors offline), timing each
phase and reporting the peak RSS (VmHWM) and how much of it the imports alone took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

PEAK = r"""
import re, sys
def peak_rss_mib():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
"""

PHASES = (
    PEAK
    + r"""
import json, time
from pathlib import Path
from energydiag.analyses.curves import analyse
from energydiag.analyses.early_warning import with_alarms
from energydiag.io.metrics import load_metrics
imports = peak_rss_mib()
t0 = time.perf_counter()
frame = load_metrics(Path(sys.argv[1]))
t1 = time.perf_counter()
report = with_alarms(analyse(frame, "loss"), frame)  # what `curves` does with a log file
t2 = time.perf_counter()
print(json.dumps({"read_s": t1 - t0, "analyse_s": t2 - t1, "peak_rss_mib": peak_rss_mib(),
                  "imports_mib": imports, "torch": "torch" in sys.modules,
                  "found": sorted({f.code for f in report.findings}),
                  "plateaus": [(p.start, p.end) for p in report.plateaus], "spikes": [s["step"] for s in report.spikes],
                  "divergence": report.divergence.start if report.divergence else None}))
"""
)

# The command as a user runs it: the CLI's imports, the read, the analysis and the JSON.
COMMAND = (
    PEAK
    + r"""
import contextlib, io, json, time
t0 = time.perf_counter()
sys.argv = ["energydiag", "curves", sys.argv[1], "--json"]
from energydiag.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main()
print(json.dumps({"wall_s": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(),
                  "torch": "torch" in sys.modules}))
"""
)


def write_log(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(rows, dtype=np.int64)
    knee, rise = rows // 4, rows - rows // 10
    loss = np.where(steps < knee, 3 - 1.5 * steps / knee, 1.5) + rng.normal(0, 0.01, rows)
    loss[rows // 2] += 2.0
    loss = np.where(steps >= rise, 1.5 + 2.0 * (steps - rise) / (rows - rise), loss)
    pd.DataFrame({"step": steps, "loss": loss.astype(np.float32)}).to_csv(path, index=False)


def _child(code: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def main(rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.csv"
        write_log(path, rows)
        size = path.stat().st_size
        r, cli = (_child(code, path) for code in (PHASES, COMMAND))
    print(f"{rows:,} rows ({size / 2**20:.0f} MiB CSV)")
    print(
        f"  read {r['read_s']:.2f} s, analyse {r['analyse_s']:.2f} s, peak RSS "
        f"{r['peak_rss_mib']:.0f} MiB ({r['imports_mib']:.0f} MiB of it the imports; torch "
        f"{'imported' if r['torch'] else 'not imported'})"
    )
    print(
        f"  `energydiag curves FILE --json`: {cli['wall_s']:.2f} s wall, peak RSS "
        f"{cli['peak_rss_mib']:.0f} MiB (goals: under 3 s, under 600 MiB)"
    )
    print(
        f"  found {r['found']}: plateaus {r['plateaus']}, spikes {r['spikes']}, divergence from {r['divergence']}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    main(parser.parse_args().rows)
