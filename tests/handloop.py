"""A user's training loop, written by hand: plain PyTorch, with the Recorder as its only
energydiag call. Tests record their planted faults through it, so they check the contract a
user relies on rather than energydiag's own step helpers."""

from __future__ import annotations

import contextlib
import functools
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from energydiag import Recorder
from energydiag.reference.synthetic import Task, batches

SMALL = {"d_context": 16, "d_action": 3, "horizon": 4, "d_model": 16, "n_heads": 2}
Plant = Callable[[int, torch.nn.Module, dict[str, torch.Tensor]], None]


def train(
    run_dir: Path,
    *,
    steps: int = 20,
    model: str = "energydiag.reference.models:EnergyModel",
    model_kwargs: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    grad_clip: float | None = 1.0,
    checkpoint_every: int = 5,
    keep_batches: int = 32,
    persist_batches: bool = True,
    plant: Plant | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    autocast: torch.dtype | None = None,
    extra: dict[str, float] | None = None,
    skip_nonfinite: bool = False,
    task: Task | None = None,
    seed: int = 0,
    monitors: list | None = None,
) -> Recorder:
    torch.manual_seed(seed)
    kwargs = {**SMALL, **(model_kwargs or {})}
    net = pkgutil.resolve_name(model)(**kwargs)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = scheduler(optimizer) if scheduler else None
    loss = loss or {"name": "inbatch_infonce", "kwargs": {"tau": 0.5}}
    target = loss.get("target") or f"energydiag.reference.losses:{loss['name']}"
    loss_fn = functools.partial(pkgutil.resolve_name(target), **loss.get("kwargs", {}))
    data = batches(task or Task(), seed=1 + seed)
    precision = str(autocast).replace("torch.", "") if autocast else None
    with Recorder(
        run_dir,
        model=net,
        optimizer=optimizer,
        model_spec={"target": model, "kwargs": kwargs},
        loss=loss,
        grad_clip=grad_clip,
        autocast_dtype=precision,
        checkpoint_every=checkpoint_every,
        keep_batches=keep_batches,
        persist_batches=persist_batches,
        monitors=monitors,
    ) as rec:
        for step in range(steps):
            batch = next(data) | {k: torch.tensor(v) for k, v in (extra or {}).items()}
            if plant:
                plant(step, net, batch)
            rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            casting = (
                torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
            )
            with casting:
                out = loss_fn(net, batch)
            value = out[0] if isinstance(out, tuple) else out
            value.backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip or float("inf"))
            healthy = rec.end_step(value, grad_norm=norm)
            if healthy or not skip_nonfinite:
                optimizer.step()
            if sched:
                sched.step()
        rec.save_checkpoint(steps)
    return rec


def train_accumulating(
    run_dir: Path,
    plant: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    steps: int = 10,
) -> Path:
    """Two losses over 4 micro-batches, accumulated, clipped, then one AdamW step: the loop
    that ``faulty:accumulating_step`` mirrors for replay. ``plant`` may edit a step's batch."""
    from faulty import MICRO_BATCHES, split, two_losses

    from energydiag.reference.models import EnergyModel

    torch.manual_seed(0)
    model = EnergyModel(**SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = batches(Task(batch=16), seed=1)
    with Recorder(
        run_dir,
        model=model,
        optimizer=optimizer,
        model_spec={"target": "energydiag.reference.models:EnergyModel", "kwargs": SMALL},
        loss={"name": "inbatch_infonce", "kwargs": {"tau": 0.5}},
        grad_clip=1.0,
        step="faulty:accumulating_step",
        checkpoint_every=4,
        persist_batches=True,
    ) as rec:
        for step in range(steps):
            batch = next(data)
            if plant:
                plant(step, batch)
            rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in split(batch):
                loss = two_losses(model, micro) / MICRO_BATCHES
                loss.backward()
                total = total + loss.detach()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            rec.end_step(total, grad_norm=norm)
            optimizer.step()
    return run_dir
