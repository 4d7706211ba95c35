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

import os
from dataclasses import replace

import torch
import torch.distributed as dist

from energydiag.analyses.launch import launch, process_group
from energydiag.analyses.rank_logs import negatives
from energydiag.analyses.replaying import RankOutcome, ReplaySummary, replay_report
from energydiag.engine.localise import PHASES, Fault
from energydiag.engine.ranks import gather
from energydiag.engine.replay import plan
from energydiag.engine.session import resolve_device
from energydiag.errors import OptionError
from energydiag.io.rundir import Run


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
    """Replay on ``nproc`` processes (the recorded world, or a divisor of it down to one, each
    playing its share of the recorded ranks in turn) and merge their reports (rank 0's view
    plus the earliest fault). A run whose ranks trained their own copies replays them one
    after another in this process: nothing ties them together."""
    run = Run(root)
    world = run.manifest.world_size
    if run.manifest.rank_copies:
        return replay_copies(run, from_step, to_step, device, every)
    if nproc < 1 or world % nproc:
        raise OptionError(
            f"the run was recorded by {world} rank(s): use {world} or a divisor of it",
            "nproc",
            value=nproc,
        )
    for rank in range(world):  # what every rank will need, checked before anything starts
        plan(Run(root, rank=rank), run.checkpoint_at_or_before(from_step), to_step)
    shared = None if nproc == world else f"{world} recorded ranks played by {nproc} process(es)"
    if nproc == 1 and run.manifest.parallelism == "ddp":  # FSDP needs a group, even of one
        found = replay_report(run, from_step, to_step, resolve_device(device), every).summary()
        return _with_negatives(run, replace(found, placement=shared))
    kind, note = placement(nproc, device)
    note = "; ".join(filter(None, (shared, note))) or None
    return _launch(run, from_step, to_step, nproc, kind, every, note)


def replay_copies(
    run: Run, from_step: int, to_step: int | None, device: str, every: int
) -> ReplaySummary:
    """Each rank's own copy replayed from its own checkpoints over its own batches, in turn."""
    target = resolve_device(device)
    world = run.manifest.world_size
    saved = (run.manifest.distributed or {}).get("rank_checkpoints", False)
    reports = [
        replay_report(run.of_rank(r), from_step, to_step, target, every).summary().to_dict()
        for r in (range(world) if saved else [0])
    ]
    note = f"each of the {world} ranks' own copies replayed in turn in one process"
    if not saved:
        note = (
            f"rank 0's copy replayed alone: the other {world - 1} ranks saved no checkpoints "
            "of their own (rank_checkpoints=False)"
        )
    return merge(run, reports, note)


def _launch(
    run: Run, from_step: int, to_step: int | None, nproc: int, kind: str, every: int, note
) -> ReplaySummary:
    results = launch(nproc, rank_worker, str(run.root), from_step, to_step, kind, every)
    return merge(run, results[min(results)], note)


def _with_negatives(run: Run, summary: ReplaySummary) -> ReplaySummary:
    found = negatives(run)
    return replace(summary, findings=[*summary.findings, *([found] if found else [])])


def rank_worker(
    root: str, from_step: int, to_step: int | None, device: str, every: int = 0
) -> list[dict]:
    """One rank of a replay, in torchrun's environment; every rank's report, in rank order."""
    kind = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    local = int(os.environ.get("LOCAL_RANK", 0))
    target = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(target)
    with process_group("nccl" if kind == "cuda" else "gloo"):
        per = Run(root).manifest.world_size // dist.get_world_size()
        run = Run(root, rank=dist.get_rank() * per)  # the first of the recorded ranks it plays
        return gather(
            replay_report(run, from_step, to_step, device=target, every=every).summary().to_dict()
        )


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
        merged.fault = replace(fault, rank=rank if fault.rank is None else fault.rank)
        merged.findings = reports[rank].findings
    return _with_negatives(run, merged)


def _phase(fault: Fault) -> int:
    return PHASES.index(fault.phase) if fault.phase in PHASES else len(PHASES)
