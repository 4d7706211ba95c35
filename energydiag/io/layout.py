"""Names and places inside a run directory (format "energydiag/1").

Kept apart from the loader so that the Recorder (which writes) and the run loader (which reads)
agree on every path by construction.
"""

from __future__ import annotations

import re
from pathlib import Path

FORMAT = "energydiag/1"
# A run recorded by several ranks: each rank's batches are step-N.rank-R.safetensors. Version 1
# runs (one process) are read as before.
FORMAT_RANKS = "energydiag/2"
MANIFEST = "run.json"
METRICS = "metrics.jsonl"
FAILURE = "failure.json"
RANKS = "ranks.jsonl"
ALERTS = "alerts.jsonl"  # the live monitors' alarms, one JSON object per line
SKIP_BATCHES = "skip_batches.json"  # steps whose update on_alarm="skip" dropped  # rank 0's comparison of the ranks' parameters, every few steps
CHECKPOINTS = "checkpoints"
BATCHES = "batches"

_STEP_FILE = re.compile(r"^step-(\d{8})\.safetensors$")
_STEP_FOLDER = re.compile(r"^step-(\d{8})$")
_RANK_FILE = re.compile(r"^step-(\d{8})\.rank-(\d+)\.safetensors$")


_DIGITS = re.compile(r"[0-9]{1,8}")


def parse_step(text: object) -> int | None:
    """A step number written as text ('120'), or None: ASCII digits only ('²' is a digit to
    str.isdigit but not to int), at most 8 of them, as in the file names."""
    return int(text) if isinstance(text, str) and _DIGITS.fullmatch(text) else None


def step_file(step: int) -> str:
    if step < 0 or step > 99_999_999:
        raise ValueError(f"step {step} is outside 0..99999999")
    return f"step-{step:08d}.safetensors"


SIDECAR = "energydiag.json"  # our metadata inside a torch.distributed.checkpoint folder


def checkpoint_path(root: Path, step: int, rank: int | None = None) -> Path:
    """The step's checkpoint: a safetensors file, or (a sharded run) a DCP folder. ``rank``:
    another rank's own copy, in a run whose ranks each train theirs (rank 0's is the run's)."""
    if rank:
        return (
            Path(root)
            / CHECKPOINTS
            / step_file(step).replace(".safetensors", f".rank-{rank}.safetensors")
        )
    folder = Path(root) / CHECKPOINTS / step_file(step).removesuffix(".safetensors")
    if (folder / ".metadata").is_file():
        return folder
    return Path(root) / CHECKPOINTS / step_file(step)


def batch_path(root: Path, step: int, rank: int | None = None) -> Path:
    name = step_file(step)
    if rank is not None:
        name = name.replace(".safetensors", f".rank-{rank}.safetensors")
    return Path(root) / BATCHES / name


def _dcp_folder(path: Path) -> re.Match | None:
    match = _STEP_FOLDER.match(path.name)
    return match if match and (path / ".metadata").is_file() else None


def metrics_path(root: Path, rank: int | None = None) -> Path:
    """Rank 0's log is the run's log (``metrics.jsonl``); other ranks log beside it."""
    return Path(root) / (METRICS if not rank else f"metrics.rank-{rank}.jsonl")


def steps_in(folder: Path, rank: int | None = None) -> list[int]:
    """Steps of the ``step-NNNNNNNN.safetensors`` files in a folder (or of one rank's
    ``step-NNNNNNNN.rank-R.safetensors``), ascending."""
    if not folder.is_dir():
        return []
    if rank is None:
        found = (_STEP_FILE.match(p.name) or _dcp_folder(p) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)
    ranked = (_RANK_FILE.match(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in ranked if m and int(m.group(2)) == rank)
