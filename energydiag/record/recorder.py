"""The flight recorder: a few lines in a training loop that make its failures replayable.

    with Recorder("runs/exp1", model=model, optimizer=opt, model_spec=..., loss=...) as rec:
        for step, batch in enumerate(loader):
            rec.start_step(step, batch)         # RNG state + batch into the ring; checkpoint every N
            loss = ...; loss.backward(); gnorm = clip_grad_norm_(...)
            rec.end_step(loss, grad_norm=gnorm)  # before optimizer.step(): a failure dumps pre-step state
            opt.step(); sched.step()

Per step it costs one RNG-state copy, one clone of the batch, a read of the optimizer's scalar
hyperparameters (so any schedule replays) and a single host sync. Memory is bounded by
``keep_batches``. A non-finite loss or gradient norm, an exception leaving the ``with`` block, or
an explicit ``dump()`` writes the ring and the pre-step state to disk.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from energydiag.engine import environment
from energydiag.engine.consistency import compare, fingerprints
from energydiag.engine.plugins import check_model_spec
from energydiag.engine.ranks import (
    flagged_ranks,
    gather_tensor,
    rank_and_world,
    rank_codes,
    unwrap,
)
from energydiag.engine.tensorstats import plain
from energydiag.errors import DiagError, first_line
from energydiag.io.atomic import write_text_atomic
from energydiag.io.layout import (
    FAILURE,
    MANIFEST,
    RANKS,
    batch_path,
    checkpoint_path,
    metrics_path,
)
from energydiag.io.state import (
    HYPERPARAMETERS,
    SCALER_STATE,
    capture_rng,
    hyperparameters,
    pack_state,
    scaler_settings,
)
from energydiag.io.tensorfile import write_atomic
from energydiag.record.alarms import AlarmDesk, OnAlarm
from energydiag.record.live import Watched, energy_target, measure_all, quantities_for
from energydiag.record.monitors import Monitor
from energydiag.record.peers import PeerAlarm
from energydiag.record.peers import available as peers_available
from energydiag.record.run_manifest import recorded_manifest, with_ranks


class Recorder:
    """Writes an energydiag/1 run directory from inside a user's training loop.

    Checkpoint ``step-N`` holds the state *before* batch N is consumed, so replay from N starts
    with batch N. ``optimizer_start_step`` records a warm-up: steps before it compute and log the
    loss but the loop does not call ``optimizer.step()``. ``end_step`` must run before
    ``optimizer.step()``: when the loss or gradient norm is non-finite, the model and optimizer
    are then still in their pre-step state, and that state is what gets dumped next to the ring.
    ``step`` names the loop's own step function ('pkg.mod:fn') when it is not the built-in one.
    ``scaler``: the loop's GradScaler; its state is recorded per step, and a non-finite gradient
    norm (which it skips) is then not a failure, while a non-finite loss still is.
    ``energy``: where the energy model is when ``loss`` is not an energy loss (a trainer's own
    step), ``{"module": "path.in.model", "loss": {"name": "inbatch_infonce", "kwargs": {...}}}``,
    so the energy rules (saturation, loss at chance or at the floor) watch it too.

    Under torchrun, create it on every rank, with whatever model the rank trains: DDP, FSDP2,
    or a plain module (each rank's own copy, nothing keeps them equal). Each rank records its own
    batches, rank 0 the manifest and checkpoints (every rank its own copy's, for a plain module,
    unless ``rank_checkpoints=False``), and the ranks vote on every step's health, so a NaN on
    one rank dumps them all. Every ``consistency_every`` steps (and at each checkpoint) the ranks
    compare fingerprints of their parameters; rank 0 logs where they differ (``ranks.jsonl``).
    ``in_ddp``: ``model`` is the module a DDP wrapper the loop cannot reach keeps equal (the HF
    Trainer hands callbacks its unwrapped model), so the run is recorded as DDP.
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
        step: str | None = None,
        checkpoint_every: int = 100,
        keep_batches: int = 16,
        persist_batches: bool = False,
        overwrite: bool = False,
        check_spec: bool = True,
        scaler: torch.amp.GradScaler | None = None,
        parallelize: str | None = None,
        in_ddp: bool = False,
        rank_checkpoints: bool = True,
        consistency_every: int = 10,
        peer_timeout: float = 30.0,
        monitors: list[Monitor] | None = None,
        on_alarm: OnAlarm = "warn",
        energy: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = Path(run_dir)
        if min(checkpoint_every, keep_batches) < 1 or consistency_every < 0:
            raise ValueError("checkpoint_every, keep_batches >= 1 and consistency_every >= 0")
        self.rank, self.world = rank_and_world()
        # Every rank looks before rank 0 writes (the vote is also the barrier).
        if flagged_ranks((self.root / MANIFEST).exists() and not overwrite):
            raise DiagError(self.root, "already holds a run; pass overwrite=True to replace it")
        self.model, self.optimizer, self.scaler = unwrap(model), optimizer, scaler
        self.checkpoint_every, self.persist_batches = checkpoint_every, persist_batches
        self.manifest = recorded_manifest(
            model_spec, loss, optimizer, grad_clip, autocast_dtype, seed, optimizer_start_step, step
        )
        self.manifest = with_ranks(self.manifest, model, parallelize, rank_checkpoints, in_ddp)
        self.manifest.environment.update(environment.capture(next(model.parameters()).device))
        if scaler is not None:
            self.manifest = replace(self.manifest, scaler=scaler_settings(scaler))
        if check_spec:
            check_model_spec(self.manifest.model, self.model)
        self.ring: deque[tuple[int, dict[str, torch.Tensor], dict[str, str]]] = deque(
            maxlen=keep_batches
        )
        self.failures: list[dict[str, Any]] = []
        self._step, self._ended, self._failing = None, False, False
        self.root.mkdir(parents=True, exist_ok=True)
        self.lead = self.rank == 0  # writes what is shared: manifest, checkpoints, failure.json
        if self.lead:
            write_text_atomic(self.root / MANIFEST, self.manifest.to_json())
        self._metrics = metrics_path(self.root, self.rank).open("w")
        self._lock = threading.Lock()  # the ring, between the loop and a peer's alarm
        self._join_ranks(consistency_every, peer_timeout)
        self._watch(monitors, on_alarm, energy)

    def _watch(self, monitors: list[Monitor] | None, on_alarm: OnAlarm, energy: Any) -> None:
        """The alarm desk and the quantities its monitors read, those that apply here."""
        self.alarms = AlarmDesk(self.root, monitors, on_alarm, self.lead)
        read = {column for m in self.alarms.monitors for column in m.columns}
        target = energy_target(self.model, energy)
        self.quantities = quantities_for(
            read, Watched(self.model, self.optimizer, self.manifest, target)
        )

    def _join_ranks(self, consistency_every: int, peer_timeout: float) -> None:
        """What only a multi-rank run has: its parallelism, the comparison of the ranks'
        parameters, and the alarm that tells every rank when one raises."""
        distributed = self.manifest.distributed or {}
        self.sharded = distributed.get("parallelism") == "fsdp"
        self.own_copies = bool(distributed.get("rank_checkpoints"))
        # sharded parameters differ across ranks by design: nothing to compare
        self.consistency_every = 0 if self.sharded or self.world == 1 else consistency_every
        compares = self.lead and self.consistency_every
        self._ranks = (self.root / RANKS).open("w") if compares else None
        self.peer_timeout = peer_timeout
        told = self.world > 1 and peers_available()  # see record/peers.py
        self._peers = PeerAlarm(self.rank, self.world, self._peer_raised) if told else None

    @property
    def failed_at(self) -> int | None:
        return self.failures[0]["step"] if self.failures else None

    def start_step(self, step: int, batch: Mapping[str, torch.Tensor]) -> None:
        if step % self.checkpoint_every == 0:
            self.save_checkpoint(step)
        if self.consistency_every and (
            step % self.consistency_every == 0 or step % self.checkpoint_every == 0
        ):
            self._compare_ranks(step)
        record = {k: v.detach().clone() for k, v in batch.items()} | capture_rng()
        meta = {"kind": "batch", "step": str(step)}
        if self.scaler is not None:
            meta[SCALER_STATE] = json.dumps(self.scaler.state_dict())
        with self._lock:  # a peer's dump, on the watcher thread, sees a step with its batch
            self.ring.append((step, record, meta))
            self._step, self._ended = step, False
        for quantity in self.quantities:
            quantity.start(step, dict(batch))

    def add_to_step(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """More of this step's batch, after ``start_step``: the later micro-batches of gradient
        accumulation, which the trainer loads after the first one's forward."""
        if self._step is None or self._ended:
            raise RuntimeError("add_to_step() called outside a step")
        with self._lock:
            self.ring[-1][1].update({k: v.detach().clone() for k, v in tensors.items()})

    def end_step(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None, **scalars: Any
    ) -> bool:
        """Log the step and its hyperparameters; on a non-finite loss or grad norm, dump.

        Any scalar whose name ends in ``grad_norm`` (``clipped_grad_norm`` from a trainer that
        only shows gradients after clipping) counts as a gradient norm. Returns True when the
        step is healthy.
        """
        if self._step is None:
            raise RuntimeError("end_step() called without start_step()")
        self._ended = True
        groups = hyperparameters(self.optimizer)
        self.ring[-1][2][HYPERPARAMETERS] = json.dumps(groups)
        if self.persist_batches:
            self._write_batch(*self.ring[-1])
        names = ["loss"] + ([] if grad_norm is None else ["grad_norm"]) + list(scalars)
        values = [loss] + ([] if grad_norm is None else [grad_norm]) + list(scalars.values())
        measured = measure_all(self.quantities, self._step)  # synced with the rest: one sync
        names, values = [*names, *measured], [*values, *measured.values()]
        row = dict(zip(names, _to_floats(values), strict=True))
        # The schedule, every step, where no ring of batches reaches: the largest group lr.
        lrs = [float(g["lr"]) for g in groups if isinstance(g.get("lr"), int | float)]
        if lrs:
            row.setdefault("lr", max(lrs))
        self._metrics.write(json.dumps({"step": self._step, **row}) + "\n")
        # With a GradScaler, an overflowing gradient is what the scaler exists to skip.
        norms = [v for k, v in row.items() if k.endswith("grad_norm")]
        norm_ok = self.scaler is not None or all(math.isfinite(v) for v in norms)
        alarms = self.alarms.check(self._step, row)
        codes = rank_codes((not math.isfinite(row["loss"])) + 2 * (not norm_ok) + 4 * bool(alarms))
        # one rank's failure is every rank's: each dumps its own ring
        healthy = not any(c & 3 for c in codes)
        if not healthy and not self._failing:  # a new failure, not the same one continuing
            if self.world > 1:
                row["ranks"] = [r for r, c in enumerate(codes) if c]
                row["loss_ranks"] = [r for r, c in enumerate(codes) if c & 1]
            self._dump("non-finite loss or gradient norm", pre_step=True, together=True, **row)
        self._failing = not healthy
        alarmed = [r for r, c in enumerate(codes) if c & 4]
        if healthy and alarmed:
            self.alarms.act(self._step, alarms, alarmed, self.model, self._keep)
        return healthy

    def _keep(self, reason: str) -> dict[str, Any]:
        """An alarm's evidence: the ring and the pre-step state, without calling it a failure."""
        return self._dump(reason, pre_step=True, together=True, failure=False)

    def dump(self, reason: str, **evidence: Any) -> None:
        """Write the ring of recent batches, the pre-step state when it is intact, failure.json.

        Call it from your own error handling; the ``with`` block calls it on an exception.
        Recording goes on afterwards: a run that recovers and fails again is dumped again, and
        failure.json lists the later failures under "later".
        """
        # Before end_step, forward and backward have run but no update: the state is pre-step.
        # After it, optimizer.step() may have half-run, so only the last regular checkpoint holds.
        self._dump(reason, pre_step=not self._ended, together=False, **evidence)

    def _dump(
        self, reason: str, pre_step: bool, together: bool, failure: bool = True, **evidence: Any
    ) -> dict[str, Any] | None:
        """``together``: every rank dumps now (the health vote), so a sharded checkpoint, which
        needs them all, can be saved; one rank's exception alone cannot save one. ``failure``:
        the entry goes to failure.json (an alarm's does not: the run has not failed)."""
        if self._step is None:
            return None
        with self._lock:
            self._metrics.flush()
            ring = list(self.ring)
            for ring_step, record, meta in ring:
                if not self._batch_path(ring_step).exists():
                    self._write_batch(ring_step, record, meta)
        entry = {"step": self._step, "reason": reason, **evidence, "batches_from": ring[0][0]}
        if pre_step and self.sharded and not together:
            entry["checkpoint_missing"] = (
                "an FSDP checkpoint is saved by every rank together, and this failure reached "
                "the ranks one at a time: replay from the last regular checkpoint"
            )
        pre_step = pre_step and (together or not self.sharded)
        if pre_step:
            self.save_checkpoint(self._step)
        entry["checkpoint"] = self._step if pre_step else None
        if failure:
            self.failures.append(entry)
            self._write_failures()
        return entry

    def _write_failures(self) -> None:
        """Every rank says what it saw; rank 0's is the run's failure.json."""
        report = {**self.failures[0], "later": self.failures[1:]}
        name = FAILURE if self.lead else FAILURE.replace(".json", f".rank-{self.rank}.json")
        write_text_atomic(self.root / name, json.dumps(report, indent=2) + "\n")

    def _peer_raised(self, message: dict[str, Any]) -> None:
        """Another rank raised: keep this rank's ring (its state may be mid-step)."""
        peer = message.get("rank")
        self._dump(
            f"rank {peer} raised",
            pre_step=False,
            together=False,
            raised_on=peer,
            exception=message.get("exception"),
        )

    def save_checkpoint(self, step: int) -> Path | None:
        """Rank 0 writes a DDP run's (replicas are equal); every rank its shard of an FSDP one."""
        if self.sharded:
            # DCP takes ~0.6 s to import: imported by FSDP runs only
            from energydiag.engine.sharded import save_sharded

            folder = checkpoint_path(self.root, step).with_suffix("")
            return save_sharded(folder, step, self.model, self.optimizer, self.lead)
        if not (self.lead or self.own_copies):
            return None
        tensors, meta = pack_state(self.model, self.optimizer)
        path = checkpoint_path(self.root, step, self.rank if self.own_copies else None)
        write_atomic(path, tensors, {"kind": "checkpoint", "step": str(step), **meta})
        return path

    def _compare_ranks(self, step: int) -> None:
        """Rank 0 logs whether the ranks' parameters (before this step) are the same."""
        names, local = fingerprints(self.model)
        compared = compare(names, gather_tensor(local))
        if self.lead:
            self._ranks.write(json.dumps({"step": step, **compared}) + "\n")
            self._ranks.flush()

    def close(self) -> None:
        for quantity in self.quantities:
            quantity.close()
        if self._peers is not None:
            self._peers.close()
        self._metrics.close()
        if self._ranks is not None:
            self._ranks.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb) -> None:
        try:
            if isinstance(exc, Exception):
                self.dump("exception", exception=first_line(exc))
                self._tell_peers(first_line(exc))
        finally:
            self.close()

    def _tell_peers(self, exception: str) -> None:
        """Every other rank dumps its ring too; failure.json says which did not in time."""
        if self._peers is None or self._step is None:
            return
        silent = self._peers.tell({"step": self._step, "exception": exception}, self.peer_timeout)
        self.failures[-1]["ranks_without_dump"] = silent
        self._write_failures()

    def _batch_path(self, step: int) -> Path:
        return batch_path(self.root, step, self.rank if self.world > 1 else None)

    def _write_batch(self, step: int, record: Mapping[str, torch.Tensor], meta: dict) -> None:
        write_atomic(self._batch_path(step), record, meta)


def _to_floats(values: list[Any]) -> list[float]:
    """All of a step's scalars with one host sync: stack the tensors, then a single tolist()."""
    tensors = [plain(v.detach()).float().reshape(()) for v in values if isinstance(v, torch.Tensor)]
    synced = iter(
        torch.stack([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else []
    )
    return [next(synced) if isinstance(v, torch.Tensor) else float(v) for v in values]
