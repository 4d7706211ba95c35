"""Replay cost per step on 1 and 2 ranks (gloo, CPU), each against a plain DDP step.

    python benchmarks/bench_ranks.py [--steps N]

For each world size W: W processes record a DDP run of the benchmark model with the Recorder,
then, inside the same processes, time plain DDP steps (forward, backward, clip, AdamW) and the
replay's steps of that run (its cheap check included), interleaved in blocks so noise hits both
alike. Prints medians per step and their ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import MODEL, TASK

from energydiag import Recorder
from energydiag.engine.replay import run_step
from energydiag.engine.session import open_session
from energydiag.io.rundir import Run
from energydiag.reference.losses import inbatch_infonce
from energydiag.reference.models import EnergyModel
from energydiag.reference.synthetic import batches


def worker(rank: int, world: int, root: str, steps: int, out: dict) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kwargs = TASK.model_shapes() | MODEL
    model = torch.nn.parallel.DistributedDataParallel(EnergyModel(**kwargs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(TASK, seed=rank)
    spec = {"target": "energydiag.reference.models:EnergyModel", "kwargs": kwargs}
    loss = {"name": "inbatch_infonce", "kwargs": {"tau": 0.5}}

    def plain_step(batch: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        value, _ = inbatch_infonce(model, batch, tau=0.5)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    with Recorder(
        root,
        model=model,
        optimizer=optimizer,
        model_spec=spec,
        loss=loss,
        grad_clip=1.0,
        checkpoint_every=steps,
        persist_batches=True,
        overwrite=True,
    ) as rec:
        for step in range(steps):
            batch = next(data)
            rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            value, _ = inbatch_infonce(model, batch, tau=0.5)
            value.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            rec.end_step(value, grad_norm=norm)
            optimizer.step()
    dist.barrier()
    run = Run(root, rank=rank if world > 1 else None)
    session = open_session(run, 0, torch.device("cpu"))
    logged = [run.batch(s) for s in range(steps)]
    plain, replayed = [], []
    for block in range(0, steps, 5):
        for s in range(block, min(steps, block + 5)):
            start = time.perf_counter()
            plain_step(logged[s].tensors)
            plain.append(time.perf_counter() - start)
        for s in range(block, min(steps, block + 5)):
            start = time.perf_counter()
            run_step(session, logged[s])
            replayed.append(time.perf_counter() - start)
    if rank == 0:
        out[world] = (statistics.median(plain), statistics.median(replayed))


def ranked(rank: int, world: int, port: int, root: str, steps: int, out: dict) -> None:
    """The process group around the measurement, freed after the DDP models it held."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, root, steps, out)
    finally:
        gc.collect()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(steps: int) -> None:
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            root = str(Path(tmp) / f"w{world}")
            mp.spawn(ranked, args=(world, free_port(), root, steps, results), nprocs=world)
    print(f"{'ranks':>5}  {'plain DDP step':>15}  {'replay step':>12}  ratio")
    for world in (1, 2):
        plain, replayed = results[world]
        print(
            f"{world:>5}  {plain * 1e3:>12.1f} ms  {replayed * 1e3:>9.1f} ms  {replayed / plain:.2f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    main(parser.parse_args().steps)
