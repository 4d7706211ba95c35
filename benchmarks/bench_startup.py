"""How long `energydiag --help` and `--version` take, against a bare `python -c pass`.

    python benchmarks/bench_startup.py [--rounds N]

Goal (issue 11): under 0.3 s, which means neither torch nor pandas is imported at start-up.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

from common import report


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main(rounds: int) -> None:
    exe = shutil.which("energydiag") or sys.argv[0]
    variants = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "energydiag --version": [exe, "--version"],
        "energydiag --help": [exe, "--help"],
        "energydiag replay --help": [exe, "replay", "--help"],
    }
    times = {
        name: sorted(timed(cmd) for _ in range(rounds))[rounds // 2]
        for name, cmd in variants.items()
    }
    report(f"start-up, median of {rounds} runs", times, "python -c pass")
    slowest = max(v for k, v in times.items() if k != "python -c pass")
    print(f"  slowest energydiag start-up: {slowest:.3f} s (goal < 0.3 s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    main(parser.parse_args().rounds)
