"""Replaying a multi-rank run: one process per recorded rank, through torch.distributed.

The processes are started by torchrun's own launcher (``torch.distributed.launcher``), so they
see the environment torchrun gives (RANK, WORLD_SIZE, MASTER_ADDR...); a user who starts
``energydiag replay`` under torchrun themselves gets the same workers without a second launch.
Each rank rebuilds the model from the checkpoint, wraps it in DDP (or shards it with the run's
own function) and replays its own logged batches, so gradients are all-reduced and gathered
negatives gathered for real. Ranks stop and
localise together; the report names the first rank, step, phase, module and op.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import uuid
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from energydiag import findings as rules
from energydiag.analyses.replaying import RankOutcome, ReplaySummary, replay_report
from energydiag.engine.localise import PHASES, Fault
from energydiag.engine.ranks import gather
from energydiag.engine.replay import plan
from energydiag.errors import DiagError, OptionError
from energydiag.io.rundir import Run

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TIMEOUT = timedelta(minutes=5)  # a rank that died leaves the others waiting at most this long


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def placement(nproc: int, device: str) -> tuple[str, str | None]:
    """Backend and device kind for ``nproc`` ranks, and a note when ranks fall back to CPU."""
    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if device != "cpu" and gpus >= nproc:
        return "cuda", None
    if device.startswith("cuda"):
        raise OptionError(f"{nproc} ranks need {nproc} GPUs, found {gpus}", "device", value=device)
    note = f"{nproc} ranks ran as CPU processes with gloo" + (
        f" ({gpus} GPU(s) for {nproc} ranks)" if gpus else ""
    )
    return "cpu", note


def replay_ranks(
    root: str,
    from_step: int,
    to_step: int | None,
    nproc: int,
    device: str = "auto",
    every: int = 0,
) -> ReplaySummary:
    """Launch ``nproc`` ranks, replay, and merge their reports (rank 0's view plus the fault)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    run = Run(root)
    if nproc != run.manifest.world_size:
        raise OptionError(
            f"the run was recorded by {run.manifest.world_size} rank(s)", "nproc", value=nproc
        )
    for rank in range(nproc):  # what every rank will need, checked before anything starts
        plan(Run(root, rank=rank), run.checkpoint_at_or_before(from_step), to_step)
    kind, note = placement(nproc, device)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    # All ranks are on this machine: gloo over loopback, whatever interface the hostname names.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    quiet = logging.getLogger("torch.distributed.elastic")
    level, quiet.level = quiet.level, logging.CRITICAL  # a rank's failure is reported below
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        results = elastic_launch(config, rank_worker)(root, from_step, to_step, kind, every)
    except ChildFailedError as err:
        raise DiagError(None, _first_failure(err)) from None
    finally:
        quiet.setLevel(level)
        for sig, handler in handlers.items():  # the launcher leaves its own handlers installed
            signal.signal(sig, handler)
    return merge(run, results[min(results)], note)


def _first_failure(err: ChildFailedError) -> str:
    rank, failure = min(err.failures.items())
    message = failure.message
    text = message.get("message", "") if isinstance(message, dict) else str(message)
    return f"replay rank {rank} failed: " + (text.removeprefix("DiagError: ") or "no message")


def rank_worker(
    root: str, from_step: int, to_step: int | None, device: str, every: int = 0
) -> list[dict]:
    """One rank of a replay, in torchrun's environment; every rank's report, in rank order."""
    kind = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    local = int(os.environ.get("LOCAL_RANK", 0))
    target = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        run = Run(root, rank=dist.get_rank())
        return gather(
            replay_report(run, from_step, to_step, device=target, every=every).summary().to_dict()
        )
    finally:
        # The replay's DDP/FSDP objects go first: one freed after its group can wait forever.
        gc.collect()
        dist.destroy_process_group()


def merge(run: Run, gathered: list[dict], note: str | None) -> ReplaySummary:
    """Rank 0's report, with the earliest fault of any rank (step, then phase, then rank), and
    how many negatives each positive meets across the ranks. Ranks hand their reports over as
    the dicts ``all_gather_object`` carries."""
    reports = [ReplaySummary.from_dict(g) for g in gathered]
    faults = [(r, rep.fault) for r, rep in enumerate(reports) if rep.fault]
    merged = replace(reports[0], placement=note)
    merged.ranks = [
        RankOutcome(r, rep.fault, rep.fidelity.get("bit_exact")) for r, rep in enumerate(reports)
    ]
    if faults:
        rank, fault = min(faults, key=lambda rf: (rf[1].step, _phase(rf[1]), rf[0]))
        merged.fault = replace(fault, rank=rank)
        merged.findings = reports[rank].findings
    negatives = _negatives(run)
    merged.findings = [*merged.findings, *([negatives] if negatives else [])]
    return merged


def _phase(fault: Fault) -> int:
    return PHASES.index(fault.phase) if fault.phase in PHASES else len(PHASES)


def _negatives(run: Run) -> rules.Finding | None:
    first = run.batch_steps[0] if run.batch_steps else None
    actions = run.batch(first).tensors.get("a_pos") if first is not None else None
    local = actions.shape[0] if actions is not None else 0
    return rules.rank_negatives(run.manifest.loss.label, local, run.manifest.world_size)
