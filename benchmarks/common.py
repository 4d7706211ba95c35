"""Shared helpers for the benchmarks: a mid-sized run and interleaved median timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from energydiag.reference.synthetic import Task, record_run

TASK = Task(batch=8, seq=32, d_context=256, horizon=8, d_action=7)
MODEL = {"d_model": 128, "n_heads": 4, "n_blocks": 2, "head": "softplus", "dropout": 0.1}


def record(folder: Path, steps: int = 12) -> Path:
    record_run(
        folder,
        task=TASK,
        model_kwargs=MODEL,
        steps=steps,
        checkpoint_every=steps,
        loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.5}},
        overwrite=True,
    )
    return folder


def interleaved_medians(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Run every variant once per round, in turn, so machine noise hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(title: str, medians: dict[str, float], baseline: str) -> None:
    print(title)
    for name, t in medians.items():
        print(f"  {name:<34} {t * 1e3:9.2f} ms   {t / medians[baseline]:6.2f}x")


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over from
    the forking parent across exec, so a child would report its parent's peak."""
    import re

    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
