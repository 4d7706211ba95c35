"""Processes the distributed tests start (torch.multiprocessing, gloo on CPU). Each function is
a training loop a user would write; energydiag only reads what it leaves on disk."""

from __future__ import annotations

import faulthandler
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def init(rank: int, world: int, port: int) -> None:
    # A rank stuck in a collective prints where and exits, instead of hanging the test run.
    faulthandler.dump_traceback_later(90, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.set_num_threads(1)


def rendezvous() -> dist.TCPStore:
    """The ranks' store, served by the launching process on a port it keeps bound: a port found
    free and released could be taken by another test's launch before rank 0 bound it."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


PRELOADED = ["torch", "dist_workers", "energydiag.record.recorder"]


def spawn(world: int, loop, *args) -> None:
    """Run ``loop(rank, *args)`` on ``world`` gloo ranks, fresh processes as torchrun starts
    them; forked from a server that has imported torch and this module once (it runs no op, so
    no thread pool is forked), which saves each rank seconds of imports."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(PRELOADED)
    store = rendezvous()
    mp.start_processes(
        run_rank,
        args=(world, store.port, loop, *args),
        nprocs=world,
        join=True,
        start_method="forkserver",
    )


def run_rank(rank: int, world: int, port: int, loop, *args) -> None:
    """One rank: its process group around the loop. The loop's objects (a DDP reducer, FSDP
    state) are freed when it returns, before the group is destroyed; freed after, a reducer can
    wait forever on a group that is gone."""
    init(rank, world, port)
    try:
        loop(rank, *args)
    finally:
        gc.collect()
        dist.destroy_process_group()


def fsdp_with_dcp_checkpoints(rank: int, out: str, blow_up_at: int) -> None:
    """FSDP2 (fully_shard) on a small MLP; a DCP checkpoint every 2 steps; from ``blow_up_at``
    the learning rate is 1e4, so the weights explode (finite) and then go NaN."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    for step in range(12):
        if step % 2 == 0:
            msd, osd = get_state_dict(model, optimizer)
            save({"model": msd, "optim": osd}, checkpoint_id=str(Path(out) / f"step-{step}"))
        if step == blow_up_at:
            for group in optimizer.param_groups:
                group["lr"] = 1e4
        x = torch.randn(4, 8, generator=g)
        loss = (model(x) ** 2).mean() * (1e30 if step >= blow_up_at + 2 else 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def shard(model: nn.Module) -> nn.Module:
    """The run's own FSDP2 wrapping, named in the manifest so replay shards the same way."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    return model


def energy_recorder(
    out: str, model: nn.Module, optimizer, loss: str = "inbatch_infonce", **options
):
    """The Recorder these loops open: the reference energy model at SMALL, swap InfoNCE at
    tau 0.5; ``options`` are the Recorder's."""
    from handloop import SMALL

    from energydiag import Recorder

    spec = {"target": "energydiag.reference.models:EnergyModel", "kwargs": SMALL}
    loss_spec = {"name": loss, "kwargs": {"tau": 0.5}}
    return Recorder(
        out, model=model, optimizer=optimizer, model_spec=spec, loss=loss_spec, **options
    )


def ddp_recorded(rank: int, out: str, plant_step: int, loss: str, sharded: bool = False) -> None:
    """A hand-written DDP (or FSDP2) loop with the Recorder; at ``plant_step`` rank 1 alone gets
    a sample whose pad_mask masks every key."""
    from handloop import SMALL

    from energydiag.reference import losses
    from energydiag.reference.models import EnergyModel
    from energydiag.reference.synthetic import Task, batches

    torch.manual_seed(0)
    model = EnergyModel(**SMALL)
    model = shard(model) if sharded else nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = batches(Task(batch=4), seed=1 + rank)
    loss_fn = getattr(losses, loss)
    with energy_recorder(
        out,
        model,
        optimizer,
        loss,
        grad_clip=1.0,
        checkpoint_every=4,
        persist_batches=True,
        parallelize="dist_workers:shard" if sharded else None,
    ) as rec:
        for step in range(8):
            batch = next(data)
            if rank == 1 and step == plant_step:
                batch["pad_mask"][2] = True
            rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            value, _ = loss_fn(model, batch, tau=0.5)
            value.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            rec.end_step(value, grad_norm=norm)
            optimizer.step()


def unsynced_recorded(rank: int, out: str, steps: int, local: int = 3) -> None:
    """The seed team's loop: the energy model is built on every rank and never wrapped, so each
    rank trains its own copy on its own ``local`` samples of the global batch (a sampler's
    slice), with its own AdamW; every rank saves its own copy."""
    from handloop import SMALL

    from energydiag.reference import losses
    from energydiag.reference.models import EnergyModel
    from energydiag.reference.synthetic import Task, batches

    torch.manual_seed(0)
    model = EnergyModel(**SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    world = dist.get_world_size()
    data = batches(Task(batch=local * world), seed=1)
    with energy_recorder(
        out, model, optimizer, grad_clip=1.0, checkpoint_every=16, persist_batches=True
    ) as rec:
        for step in range(steps):
            whole = next(data)
            batch = {k: v[rank * local : (rank + 1) * local] for k, v in whole.items()}
            rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            value, _ = losses.inbatch_infonce(model, batch, tau=0.5)
            value.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            rec.end_step(value, grad_norm=norm)
            optimizer.step()


def raises_on_rank_2(rank: int, out: str, at_step: int) -> None:
    """A DDP loop in which rank 2 alone raises in its forward at ``at_step``: the other ranks
    are then waiting in the gradient all-reduce, where no health vote reaches them."""
    from handloop import SMALL

    from energydiag.reference import losses
    from energydiag.reference.models import EnergyModel
    from energydiag.reference.synthetic import Task, batches

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(EnergyModel(**SMALL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = batches(Task(batch=4), seed=1 + rank)
    with energy_recorder(
        out, model, optimizer, checkpoint_every=4, keep_batches=3, peer_timeout=20.0
    ) as rec:
        for step in range(8):
            batch = next(data)
            rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            if rank == 2 and step == at_step:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            value, _ = losses.inbatch_infonce(model, batch, tau=0.5)
            value.backward()
            rec.end_step(value)
            optimizer.step()


Runs = list[tuple[str, int, int | None]]  # each run's directory, steps and planted row


def lightning_ddp(rank: int, runs: Runs) -> None:
    """Lightning's own DDP on these ranks, as under torchrun (LOCAL_RANK set: Lightning starts
    no processes and joins the group that is there), one fit per run in the same processes;
    its sampler gives each rank every other row, so a planted std-0 row lands on rank
    ``row % 2``."""
    import lightning.pytorch as pl
    from lit_models import LitRegressor, quiet_trainer
    from trainer_models import regression_data

    from energydiag.record.lightning import EnergydiagCallback

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(dist.get_world_size()))
    for out, steps, constant_row in runs:
        pl.seed_everything(0, verbose=False)
        x, y = regression_data(64, constant_row)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        callback = EnergydiagCallback(out, checkpoint_every=4, persist_batches=True)
        trainer = quiet_trainer(
            max_steps=steps,
            devices=dist.get_world_size(),
            strategy="ddp",
            gradient_clip_val=1.0,
            callbacks=[callback],
        )
        trainer.fit(LitRegressor(), loader)


def hf_ddp(rank: int, runs: Runs) -> None:
    """The Hugging Face Trainer's own DDP on these ranks, as under torchrun: accelerate finds
    the group that is there, the Trainer wraps the model in DDP and shards the data with a
    DistributedSampler (shuffled, seeded alike on every rank); one Trainer per run."""
    import transformers
    from trainer_models import RegressionSet, Regressor, hf_arguments, regression_data

    from energydiag.record.hf import EnergydiagCallback

    world = dist.get_world_size()
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    spec = {"target": "trainer_models:Regressor", "kwargs": {"hidden": 16, "dropout": 0.1}}
    for out, steps, constant_row in runs:
        transformers.set_seed(0)
        callback = EnergydiagCallback(
            out, model_spec=spec, checkpoint_every=4, persist_batches=True
        )
        args = hf_arguments(
            Path(out).parent / "hf-out", steps, 4, learning_rate=1e-2, max_grad_norm=1.0, seed=0
        )
        x, y = regression_data(64, constant_row)
        trainer = transformers.Trainer(
            Regressor(), args, train_dataset=RegressionSet(x, y), callbacks=[callback]
        )
        trainer.train()
