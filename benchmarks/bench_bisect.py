"""Bisect vs a linear replay from step 0 on the same recorded run: evaluations and wall time.

python benchmarks/bench_bisect.py [--steps 256] [--every 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import MODEL, TASK

from energydiag.analyses.bisection import bisect
from energydiag.engine.replay import replay
from energydiag.io.rundir import Run
from energydiag.reference.synthetic import record_run


def main(steps: int, every: int) -> None:
    torch.set_num_threads(1)
    bad_step = steps - steps // 8

    def fault(step, batch):
        if step == bad_step:
            batch["pad_mask"][0] = True

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        record_run(
            root,
            task=TASK,
            model_kwargs=MODEL,
            steps=steps,
            checkpoint_every=every,
            fault=fault,
            loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.5}},
        )
        run = Run(root)
        start = time.perf_counter()
        found = bisect(run)
        t_bisect = time.perf_counter() - start
        start = time.perf_counter()
        linear = replay(run, 0)
        t_linear = time.perf_counter() - start
    assert found.first_bad_step == linear.fault.step == bad_step
    print(f"run: {steps} steps, {len(run.checkpoint_steps)} checkpoints, first bad step {bad_step}")
    print(
        f"  bisect         {found.checkpoint_evaluations:4d} checkpoint evaluations + "
        f"{len(found.replay.result.steps):3d} step replays   {t_bisect:7.2f} s"
    )
    print(
        f"  linear replay  {len(linear.steps):4d} step replays from step 0            {t_linear:7.2f} s"
    )
    print(f"  time ratio bisect / linear: {t_bisect / t_linear:.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()
    main(args.steps, args.every)
