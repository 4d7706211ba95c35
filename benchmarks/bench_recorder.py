"""Flight-recorder overhead per training step, and the bound on its memory.

    python benchmarks/bench_recorder.py [--steps N]

Alternates blocks of plain and recorded steps on the same model, so machine noise hits both alike;
the recorded loop keeps 16 batches in its ring and checkpoints every 100 steps (the defaults).
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
from energydiag.reference.losses import inbatch_infonce
from energydiag.reference.models import EnergyModel
from energydiag.reference.synthetic import batches


def main(steps: int, block: int = 10) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kwargs = TASK.model_shapes() | MODEL
    model = EnergyModel(**kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = batches(TASK, 1)
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(
            Path(tmp) / "run",
            model=model,
            optimizer=optimizer,
            model_spec={"target": "energydiag.reference.models:EnergyModel", "kwargs": kwargs},
            loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.5}},
            grad_clip=1.0,
        )

        def one_step(step: int, recorded: bool) -> float:
            batch = next(data)
            start = time.perf_counter()
            if recorded:
                rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            loss, _ = inbatch_infonce(model, batch, tau=0.5)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if recorded:
                rec.end_step(loss, grad_norm=norm)
            else:
                float(loss)  # the loss.item() a plain loop logs anyway
            optimizer.step()
            return time.perf_counter() - start

        times: dict[bool, list[float]] = {False: [], True: []}
        for step in range(steps):
            recorded = (step // block) % 2 == 1
            times[recorded].append(one_step(step, recorded))
        ring_bytes = sum(
            t.numel() * t.element_size()
            for _, rec_batch, _meta in rec.ring
            for t in rec_batch.values()
        )
        batch_bytes = sum(t.numel() * t.element_size() for t in next(data).values())
        rec.close()
    plain, recorded = statistics.median(times[False]), statistics.median(times[True])
    print(f"recorder overhead, median over {steps // 2} steps each (1 thread, CPU)")
    print(f"  plain step     {plain * 1e3:8.2f} ms")
    print(f"  recorded step  {recorded * 1e3:8.2f} ms   {recorded / plain:5.3f}x")
    print(
        f"  ring: {len(rec.ring)} batches held (bound 16), {ring_bytes / 2**20:.2f} MiB "
        f"(one batch with RNG state: {batch_bytes / 2**20:.2f} MiB + 5 KiB)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    main(parser.parse_args().steps)
