"""Side B of `diff --against ranks=W`: the run's step on W CPU processes under DDP (gloo), each
rank the W-th shard of every batch, against the same global batch in one process.

The ranks' forwards see shards, so their ops have no partner on side A; what both sides share
is what the step leaves: the gradients (DDP's all-reduce averages the ranks' into each one's
``.grad``), the mean of the ranks' losses, and the parameters after the update. Rank 0 writes
them with safetensors for the launching process to read: nothing crosses by pickle.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from energydiag.analyses.launch import launch, process_group
from energydiag.engine.fingerprint import OpPrint, Played
from energydiag.engine.module_prints import gradients_left, gradients_of
from energydiag.engine.session import open_session
from energydiag.errors import DiagError
from energydiag.io.rundir import Run


def played_on_ranks(run: Run, step: int, world: int) -> Played:
    """The step (and the steps from its checkpoint to it) on ``world`` DDP processes."""
    for earlier in range(run.checkpoint_at_or_before(step), step + 1):  # one line, not a rank's
        batch = run.batch(earlier)
        shard(batch.on(torch.device("cpu")), 0, world, batch.path)
    with tempfile.TemporaryDirectory(prefix="energydiag-ranks-") as out:
        launch(world, ranks_worker, str(run.root), step, out)
        return _read(Path(out))


def shard(
    data: dict[str, torch.Tensor], rank: int, world: int, where: Path | None = None
) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s contiguous W-th of every tensor along the batch dimension (0-d ones
    whole), as a DistributedSampler without shuffling deals a global batch."""
    sizes = {t.shape[0] for t in data.values() if t.dim()}
    if len(sizes) != 1:
        raise DiagError(where, f"its tensors disagree on the batch dimension ({sorted(sizes)})")
    (size,) = sizes
    if size % world:
        raise DiagError(where, f"a batch of {size} does not split into {world} equal shards")
    part = size // world
    return {k: t[rank * part : (rank + 1) * part] if t.dim() else t for k, t in data.items()}


def ranks_worker(root: str, step: int, out: str) -> None:
    """One rank, in torchrun's environment."""
    with process_group("gloo"):
        played = _play_shard(Run(root), step)
        if dist.get_rank() == 0:
            _write(Path(out), played)


def _play_shard(run: Run, step: int) -> Played:
    rank, world = dist.get_rank(), dist.get_world_size()
    session = open_session(run, step, torch.device("cpu"))
    model = session.model
    session.model = nn.parallel.DistributedDataParallel(model)
    session.transform_batch = functools.partial(shard, rank=rank, world=world)
    for each in range(session.step, step + 1):
        result = session.train(run.batch(each))
    losses: list[float | None] = [None] * world
    dist.all_gather_object(losses, float(result.loss))
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    return Played(gradients_left(model), sum(losses) / world, params, gradients_of(model))


def _write(out: Path, played: Played) -> None:
    save_file({n: p.contiguous() for n, p in played.params.items()}, out / "params.safetensors")
    save_file(
        {n: g.contiguous() for n, g in (played.grads or {}).items()}, out / "grads.safetensors"
    )
    summary = {"loss": played.loss, "prints": [p.to_dict() for p in played.prints]}
    (out / "played.json").write_text(json.dumps(summary))


def _read(out: Path) -> Played:
    summary = json.loads((out / "played.json").read_text())
    params, grads = (load_file(out / f"{name}.safetensors") for name in ("params", "grads"))
    prints = [OpPrint.from_dict(p) for p in summary["prints"]]
    return Played(prints, summary["loss"], params, grads)
