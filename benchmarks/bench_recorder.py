"""Flight-recorder overhead per training step: no Recorder, monitors off, the every-step
monitors only, and the default set with its scheduled quantities; and the bound on its memory.

    python benchmarks/bench_recorder.py [--blocks N]

Times blocks of 10 steps (one period of the scheduled quantities, which measure every 10th
step), cycling the modes block by block on the same model so machine noise hits all alike; the
recorders keep 16 batches in their ring and checkpoint every 100 steps (the defaults).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import MODEL, TASK

from energydiag import Recorder
from energydiag.record.monitors import DeadGradient, GradNormBand, WeightGrowth
from energydiag.reference.losses import inbatch_infonce
from energydiag.reference.models import EnergyModel
from energydiag.reference.synthetic import batches

PERIOD = 10
MONITORS = {  # mode -> the Recorder's monitors (a factory: monitors keep state)
    "recorded, monitors off": list,
    "every-step monitors": lambda: [GradNormBand(), WeightGrowth(), DeadGradient()],
    "all monitors (default)": lambda: None,
}
MODES = ("plain", *MONITORS)


def main(blocks: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kwargs = TASK.model_shapes() | MODEL
    model = EnergyModel(**kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = batches(TASK, 1)
    with tempfile.TemporaryDirectory() as tmp:
        recorders = {
            mode: Recorder(
                Path(tmp) / str(i),
                model=model,
                optimizer=optimizer,
                model_spec={"target": "energydiag.reference.models:EnergyModel", "kwargs": kwargs},
                loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.5}},
                grad_clip=1.0,
                monitors=monitors(),
            )
            for i, (mode, monitors) in enumerate(MONITORS.items())
        }

        def one_step(step: int, rec: Recorder | None) -> None:
            batch = next(data)
            if rec:
                rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            loss, _ = inbatch_infonce(model, batch, tau=0.5)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if rec:
                rec.end_step(loss, grad_norm=norm)
            else:
                float(loss.detach())  # the loss.item() a plain loop logs anyway
            optimizer.step()

        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for block in range(blocks * len(MODES)):
            mode = MODES[block % len(MODES)]
            start = time.perf_counter()
            for i in range(PERIOD):
                one_step(block * PERIOD + i, recorders.get(mode))
            times[mode].append((time.perf_counter() - start) / PERIOD)
        rec = recorders["all monitors (default)"]
        ring_bytes = sum(
            t.numel() * t.element_size()
            for _, rec_batch, _meta in rec.ring
            for t in rec_batch.values()
        )
        batch_bytes = sum(t.numel() * t.element_size() for t in next(data).values())
        for r in recorders.values():
            r.close()
    plain = statistics.median(times["plain"])
    print(f"recorder overhead per step, median of {blocks} blocks of {PERIOD} (1 thread, CPU)")
    for mode in MODES:
        median = statistics.median(times[mode])
        print(f"  {mode:24s} {median * 1e3:8.2f} ms   {median / plain:5.3f}x")
    print(
        f"  ring: {len(rec.ring)} batches held (bound 16), {ring_bytes / 2**20:.2f} MiB "
        f"(one batch with RNG state: {batch_bytes / 2**20:.2f} MiB + 5 KiB)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=30)
    main(parser.parse_args().blocks)
