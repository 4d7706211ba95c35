"""The flight recorder: a few lines in a training loop that make its failures replayable.

    rec = Recorder("runs/exp1", model=model, optimizer=opt, model_spec=..., loss=...)
    for step, batch in enumerate(loader):
        rec.start_step(step, batch)        # RNG state + batch into the ring; checkpoint every N
        loss = ...; loss.backward(); gnorm = clip_grad_norm_(...)
        rec.end_step(loss, grad_norm=gnorm) # before optimizer.step(): a failure dumps pre-step state
        opt.step()

Per step it costs one RNG-state copy, one clone of the batch and a single host sync (loss and
grad norm stacked into one tensor). Memory is bounded by ``keep_batches``.
"""

from __future__ import annotations

import inspect
import json
import math
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from energydiag.errors import DiagError
from energydiag.layout import FAILURE, MANIFEST, METRICS, batch_path, checkpoint_path
from energydiag.manifest import Manifest, parse_manifest
from energydiag.state import capture_rng, pack_state
from energydiag.tensorfile import write_atomic, write_text_atomic


class Recorder:
    """Writes an energydiag/1 run directory from inside a user's training loop.

    Checkpoint ``step-N`` holds the state *before* batch N is consumed, so replay from N starts
    with batch N. ``optimizer_start_step`` records a warm-up: steps before it compute and log the
    loss but the loop does not call ``optimizer.step()``. ``end_step`` must run before ``optimizer.step()``: when the loss or gradient
    norm is non-finite, the model and optimizer are then still in their pre-step state, and that
    state is what gets dumped next to the ring of recent batches.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_spec: Mapping[str, Any],
        loss: Mapping[str, Any],
        grad_clip: float | None = None,
        autocast_dtype: str | None = None,
        seed: int | None = None,
        optimizer_start_step: int = 0,
        checkpoint_every: int = 100,
        keep_batches: int = 16,
        persist_batches: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.root = Path(run_dir)
        if (self.root / MANIFEST).exists() and not overwrite:
            raise DiagError(self.root, "already holds a run; pass overwrite=True to replace it")
        if checkpoint_every < 1 or keep_batches < 1:
            raise ValueError("checkpoint_every and keep_batches must be at least 1")
        self.model, self.optimizer = model, optimizer
        self.checkpoint_every, self.persist_batches = checkpoint_every, persist_batches
        self.manifest = _manifest(
            model_spec, loss, optimizer, grad_clip, autocast_dtype, seed, optimizer_start_step
        )
        self.ring: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=keep_batches)
        self.failed_at: int | None = None
        self._step: int | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.root / MANIFEST, self.manifest.to_json())
        self._metrics = (self.root / METRICS).open("w")

    def start_step(self, step: int, batch: Mapping[str, torch.Tensor]) -> None:
        self._step = step
        if step % self.checkpoint_every == 0:
            self.save_checkpoint(step)
        record = {k: v.detach().clone() for k, v in batch.items()} | capture_rng()
        self.ring.append((step, record))
        if self.persist_batches:
            self._write_batch(step, record)

    def end_step(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None, **scalars: Any
    ) -> bool:
        """Log the step; on the first non-finite loss or grad norm, dump. True when healthy."""
        if self._step is None:
            raise RuntimeError("end_step() called without start_step()")
        names = ["loss"] + ([] if grad_norm is None else ["grad_norm"]) + list(scalars)
        values = [loss] + ([] if grad_norm is None else [grad_norm]) + list(scalars.values())
        row = dict(zip(names, _to_floats(values), strict=True))
        self._metrics.write(json.dumps({"step": self._step, **row}) + "\n")
        healthy = math.isfinite(row["loss"]) and math.isfinite(row.get("grad_norm", 0.0))
        if not healthy and self.failed_at is None:
            self._dump_failure(self._step, row)
        return healthy

    def save_checkpoint(self, step: int) -> Path:
        tensors, meta = pack_state(self.model, self.optimizer)
        path = checkpoint_path(self.root, step)
        write_atomic(path, tensors, {"kind": "checkpoint", "step": str(step), **meta})
        return path

    def close(self) -> None:
        self._metrics.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_batch(self, step: int, record: Mapping[str, torch.Tensor]) -> None:
        write_atomic(batch_path(self.root, step), record, {"kind": "batch", "step": str(step)})

    def _dump_failure(self, step: int, row: Mapping[str, float]) -> None:
        self.failed_at = step
        self._metrics.flush()
        for ring_step, record in self.ring:
            if not batch_path(self.root, ring_step).exists():
                self._write_batch(ring_step, record)
        self.save_checkpoint(step)
        first = self.ring[0][0]
        report = {"step": step, **row, "batches_from": first, "checkpoint": step}
        write_text_atomic(self.root / FAILURE, json.dumps(report, indent=2) + "\n")


def _to_floats(values: list[Any]) -> list[float]:
    """All of a step's scalars with one host sync: stack the tensors, then a single tolist()."""
    tensors = [v.detach().float().reshape(()) for v in values if isinstance(v, torch.Tensor)]
    synced = iter(
        torch.stack([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else []
    )
    return [next(synced) if isinstance(v, torch.Tensor) else float(v) for v in values]


def _manifest(
    model_spec: Mapping[str, Any],
    loss: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
    autocast_dtype: str | None,
    seed: int | None,
    optimizer_start_step: int,
) -> Manifest:
    accepted = inspect.signature(type(optimizer).__init__).parameters
    opt_kwargs = {
        k: v
        for k, v in optimizer.defaults.items()
        if k in accepted and isinstance(v, int | float | bool | tuple)
    }
    raw = {
        "format": "energydiag/1",
        "model": dict(model_spec),
        "loss": dict(loss),
        "optimizer": {
            "name": type(optimizer).__name__,
            "kwargs": opt_kwargs,
            "start_step": optimizer_start_step,
        },
        "grad_clip": grad_clip,
        "autocast_dtype": autocast_dtype,
        "seed": seed,
    }
    return parse_manifest(json.loads(json.dumps(raw)), "Recorder arguments")
