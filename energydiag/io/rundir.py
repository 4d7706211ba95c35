"""Loading an energydiag/1 run directory, validating as it goes.

Analyses never open files themselves; they ask a ``Run``. Every problem surfaces as a DiagError
naming the offending file, never as a KeyError three frames deep in a replay.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from energydiag.errors import DiagError
from energydiag.io.dcp import load_sidecar, load_state
from energydiag.io.formats import Format, sniff
from energydiag.io.layout import (
    BATCHES,
    CHECKPOINTS,
    FAILURE,
    MANIFEST,
    RANKS,
    SKIP_BATCHES,
    batch_path,
    checkpoint_path,
    metrics_path,
    parse_step,
    steps_in,
)
from energydiag.io.manifest import Manifest, read_manifest
from energydiag.io.rank_checks import read_rank_checks
from energydiag.io.scalars import first_nonfinite
from energydiag.io.skip_list import read_skip_list
from energydiag.io.state import HYPERPARAMETERS, RNG_PREFIX, SCALER_STATE, split_state
from energydiag.io.tensorfile import check_format, read_all, read_metadata
from energydiag.io.torchfiles import load_tensor_dict

if TYPE_CHECKING:
    import pandas as pd

REQUIRED_BATCH_KEYS = ("h", "a_pos")


@dataclass
class Checkpoint:
    step: int
    path: Path
    model: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    meta: dict[str, str]


@dataclass
class Batch:
    step: int
    path: Path
    tensors: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.tensors["h"].shape[0]

    def on(self, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors on ``device``; float ones cast to ``dtype`` when given."""
        return {
            k: v.to(device, dtype) if dtype and v.is_floating_point() else v.to(device)
            for k, v in self.tensors.items()
        }

    @cached_property
    def hyperparameters(self) -> list[dict[str, Any]] | None:
        """Each param group's lr, betas, eps... as they were when this step updated."""
        return parse_groups(self.path, self.meta, HYPERPARAMETERS)

    @property
    def scaler_state(self) -> dict[str, float] | None:
        """The GradScaler's state (scale, growth tracker) as this step began."""
        state = json_metadata(self.path, self.meta, SCALER_STATE)
        if state is not None and not (
            isinstance(state, dict) and isinstance(state.get("scale"), int | float)
        ):
            raise DiagError(self.path, f"metadata '{SCALER_STATE}' must hold a numeric 'scale'")
        return state


def json_metadata(path: Path, meta: dict[str, str], key: str) -> Any:
    """A JSON value stored under ``key`` in a file's string metadata; None when absent."""
    text = meta.get(key)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DiagError(path, f"metadata '{key}' is not valid JSON") from None


def parse_groups(path: Path, meta: dict[str, str], key: str) -> list[dict[str, Any]] | None:
    """A JSON list of param-group objects stored in file metadata, checked; None when absent."""
    groups = json_metadata(path, meta, key)
    if groups is not None and not (
        isinstance(groups, list) and all(isinstance(g, dict) for g in groups)
    ):
        raise DiagError(path, f"metadata '{key}' must be a list of objects")
    return groups


class Run:
    """A run directory: manifest, checkpoints, batches and metrics."""

    def __init__(self, root: str | Path, rank: int | None = None) -> None:
        """``rank``: whose batches a multi-rank run reads (default rank 0's)."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise DiagError(self.root, "run directory not found")
        if not (self.root / MANIFEST).is_file():
            raise DiagError(
                self.root.resolve(),
                f"no {MANIFEST}: not an energydiag run directory (see docs/run-format.md)",
            )
        self.manifest_path = self._inside(self.root / MANIFEST)
        self.manifest: Manifest = read_manifest(self.manifest_path)
        world = self.manifest.world_size
        if rank is not None and not 0 <= rank < world:
            raise DiagError(self.manifest_path, f"rank {rank}: the run has {world} rank(s)")
        self.rank = (rank or 0) if self.manifest.distributed else None

    def of_rank(self, rank: int) -> Run:
        """The same run as another rank reads it (its own batches and log)."""
        return Run(self.root, rank)

    @cached_property
    def checkpoint_steps(self) -> list[int]:
        return steps_in(self.root / CHECKPOINTS)

    @cached_property
    def batch_steps(self) -> list[int]:
        return steps_in(self.root / BATCHES, self.rank)

    @property
    def failure(self) -> dict | None:
        path = self.root / FAILURE
        if not path.is_file():
            return None
        try:
            return json.loads(self._inside(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DiagError(path, f"not valid JSON ({err})") from None

    @property
    def checkpoints_with_batches(self) -> list[int]:
        """Checkpoint steps whose own batch was logged: the ones a model can be run on."""
        logged = set(self.batch_steps)
        return [s for s in self.checkpoint_steps if s in logged]

    def checkpoint_at_or_before(self, step: int) -> int:
        earlier = [s for s in self.checkpoint_steps if s <= step]
        if not earlier:
            have = step_ranges(self.checkpoint_steps) or "none"
            raise DiagError(
                self.root / CHECKPOINTS, f"no checkpoint at or before step {step} (have: {have})"
            )
        return earlier[-1]

    def checkpoint_paths(self) -> dict[int, Path]:
        """step -> file of every checkpoint, each checked to stay inside the run directory."""
        return {s: self._inside(checkpoint_path(self.root, s)) for s in self.checkpoint_steps}

    def checkpoint(self, step: int) -> Checkpoint:
        """The step's checkpoint; in a run whose ranks train their own copies, this rank's."""
        path = self._inside(checkpoint_path(self.root, step, self._copy_rank))
        ckpt = load_checkpoint_file(path)
        check_format(path, ckpt.meta, "checkpoint")
        _check_step(path, ckpt.meta, step)
        return ckpt

    @property
    def _copy_rank(self) -> int | None:
        distributed = self.manifest.distributed or {}
        return self.rank if distributed.get("rank_checkpoints") else None

    def batch(self, step: int) -> Batch:
        path = self._inside(batch_path(self.root, step, self.rank))
        check_format(path, read_metadata(path), "batch")
        batch = load_batch_file(path)
        if batch.step != step:
            raise DiagError(path, f"metadata says step {batch.step}, file name says {step}")
        return batch

    def hyperparameters(self, step: int) -> list[dict[str, Any]] | None:
        """The recorded hyperparameters of step ``step`` (batch metadata only, no tensors);
        a checkpoint's param groups when that is all there is."""
        if step in set(self.batch_steps):
            path = self._inside(batch_path(self.root, step, self.rank))
            return parse_groups(path, read_metadata(path), HYPERPARAMETERS)
        if step in set(self.checkpoint_steps):
            path = self._inside(checkpoint_path(self.root, step))
            meta = load_sidecar(path) if sniff(path) is Format.DCP else read_metadata(path)
            return parse_groups(path, meta, "param_groups")
        return None

    def require_batches(self, start: int, stop: int) -> list[int]:
        """Steps start..stop (inclusive), all of which must be logged."""
        have = set(self.batch_steps)
        missing = [s for s in range(start, stop + 1) if s not in have]
        if missing:
            raise DiagError(
                self.root / BATCHES, f"missing batches for steps {step_ranges(missing)}"
            )
        return list(range(start, stop + 1))

    def metrics(self) -> pd.DataFrame:
        """The logged metrics (pandas is loaded here, not when a checkpoint is inspected)."""
        import pandas as pd

        from energydiag.io.metrics import load_metrics

        path = self._inside(metrics_path(self.root, self.rank))
        return load_metrics(path) if path.is_file() else pd.DataFrame({"step": []}, dtype="int64")

    def logged(self, metric: str = "loss") -> dict[int, float]:
        """step -> value where ``metric`` was logged (non-finite values included)."""
        return self.logged_series((metric,))[metric]

    def logged_series(self, metrics: tuple[str, ...]) -> dict[str, dict[int, float]]:
        """``logged`` for several metrics, from one read of the log."""
        from energydiag.io.metrics import metric_series

        frame = self.metrics()
        out: dict[str, dict[int, float]] = {metric: {} for metric in metrics}
        for metric in (m for m in metrics if m in frame):
            steps, values = metric_series(frame, metric)
            out[metric] = dict(zip(steps.tolist(), values.tolist(), strict=True))
        return out

    def rank_checks(self) -> list[dict[str, Any]]:
        """Whether the ranks held the same parameters, every few steps (``ranks.jsonl``)."""
        return read_rank_checks(self._inside(self.root / RANKS))

    @cached_property
    def skipped_steps(self) -> frozenset[int]:
        """Steps whose update the run skipped on an alarm: replayed without the update."""
        return read_skip_list(self._inside(self.root / SKIP_BATCHES))

    def first_failure(self) -> int | None:
        """The first step the run itself saw fail: a non-finite logged loss or gradient norm,
        or the step failure.json names (which also covers exceptions). Under a GradScaler an
        overflowing gradient norm is the scaler's signal to skip the step, not a failure."""
        watched = ("loss",) if self.manifest.scaler else ("loss", "grad_norm")
        firsts = map(first_nonfinite, self.logged_series(watched).values())
        candidates = [step for step in firsts if step is not None]
        failure = self.failure
        if isinstance(failure, dict) and isinstance(failure.get("step"), int):
            candidates.append(failure["step"])
        return min(candidates, default=None)

    def _inside(self, path: Path) -> Path:
        """Every file of a run must resolve inside it (the run-format document's rule)."""
        try:
            inside = path.resolve().is_relative_to(self.root.resolve())
        except (OSError, RuntimeError) as err:  # a symlink loop
            raise DiagError(path, f"cannot be resolved ({err})") from None
        if not inside:
            raise DiagError(path, "resolves to a path outside the run directory")
        return path


def load_checkpoint_file(path: Path) -> Checkpoint:
    """Any checkpoint: ours (model.* / optim.* prefixes), a bare safetensors state dict, or a
    torch.save'd .pt/.pth state dict (weights only)."""
    if sniff(path).is_torch_save:
        return Checkpoint(-1, path, load_tensor_dict(path), {}, {})
    tensors, meta = load_state(path) if sniff(path) is Format.DCP else read_all(path)
    model, optim = split_state(tensors)
    if not model and not optim:
        model = tensors
    if not model:
        raise DiagError(path, "holds no model tensors")
    step = parse_step(meta.get("step"))
    step = -1 if step is None else step
    return Checkpoint(step, path, model, optim, meta)


_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def step_in_name(path: Path) -> int | None:
    """The last number in a file's name: how foreign checkpoints and batches carry their step."""
    found = _LAST_NUMBER.search(Path(path).name)
    return int(found.group(1)) if found else None


def load_batch_file(path: Path, step: int | None = None, fallback: int | None = None) -> Batch:
    """``step`` overrides what the file says; ``fallback`` is used when it says nothing."""
    tensors, meta = (load_tensor_dict(path), {}) if sniff(path).is_torch_save else read_all(path)
    rng = {k: v for k, v in tensors.items() if k.startswith(RNG_PREFIX)}
    data = {k: v for k, v in tensors.items() if not k.startswith(RNG_PREFIX)}
    validate_batch(path, data)
    validate_rng(path, rng)
    found = parse_step(meta.get("step"))
    found = step_in_name(path) if found is None else found  # a foreign batch: batch_17500.pt
    found = fallback if found is None else found
    if step is None and found is None:
        raise DiagError(path, "says no step (no 'step' metadata, no number in its name)")
    return Batch(found if step is None else step, path, data, rng, meta)


def is_energy_batch(batch: Mapping[str, torch.Tensor]) -> bool:
    """Whether the batch uses the energy-model layout (h, a_pos, pad_mask...)."""
    return any(key in batch for key in (*REQUIRED_BATCH_KEYS, "pad_mask"))


def validate_batch(path: Path, batch: dict[str, torch.Tensor]) -> None:
    """Check the shapes an energy-model batch's tensors must agree on: h [B,S,D], a_pos [B,H,Da],
    ... A batch from a trainer callback holds whatever the user's model takes: any tensors."""
    if not batch:
        raise DiagError(path, "holds no batch tensors")
    if not is_energy_batch(batch):
        return
    for key in REQUIRED_BATCH_KEYS:
        if key not in batch:
            raise DiagError(path, f"missing tensor '{key}'")
    h, a = batch["h"], batch["a_pos"]
    if h.dim() != 3 or a.dim() != 3:
        raise DiagError(
            path, f"h must be [B,S,D] and a_pos [B,H,Da], got {list(h.shape)} and {list(a.shape)}"
        )
    if h.shape[0] != a.shape[0]:
        raise DiagError(path, f"batch sizes differ: h has {h.shape[0]}, a_pos has {a.shape[0]}")
    mask = batch.get("pad_mask")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(h.shape[:2])):
        raise DiagError(
            path,
            f"pad_mask must be bool [B,S]={list(h.shape[:2])}, got {mask.dtype} {list(mask.shape)}",
        )
    for key, t in batch.items():
        if key.startswith("layer_actions.") and t.shape != a.shape:
            raise DiagError(path, f"'{key}' has shape {list(t.shape)}, a_pos has {list(a.shape)}")
    neg = batch.get("a_neg")
    if neg is not None and (
        neg.dim() != 4 or neg.shape[0] != a.shape[0] or neg.shape[2:] != a.shape[1:]
    ):
        raise DiagError(path, f"a_neg must be [B,M,H,Da] matching a_pos, got {list(neg.shape)}")


def validate_rng(path: Path, rng: dict[str, torch.Tensor]) -> None:
    """Generator states are opaque bytes of a fixed size: anything else would crash the replay."""
    cpu = rng.get(RNG_PREFIX + "cpu")
    expected = torch.get_rng_state()
    if cpu is not None and (cpu.dtype != torch.uint8 or cpu.shape != expected.shape):
        raise DiagError(
            path,
            f"'{RNG_PREFIX}cpu' must be uint8 {list(expected.shape)} (torch.get_rng_state()), "
            f"got {str(cpu.dtype).replace('torch.', '')} {list(cpu.shape)}",
        )
    if cpu is not None and not _valid_generator_state(cpu):
        raise DiagError(path, f"'{RNG_PREFIX}cpu' is not a valid generator state (corrupt bytes)")
    for key, state in rng.items():
        if key.startswith(RNG_PREFIX + "cuda.") and (
            state.dtype != torch.uint8 or state.dim() != 1
        ):
            raise DiagError(path, f"'{key}' must be a 1-D uint8 generator state")


def _valid_generator_state(state: torch.Tensor) -> bool:
    """Right size is not enough: mt19937 checks its own words, and would fail mid-replay."""
    try:
        torch.Generator().set_state(state)
    except RuntimeError:
        return False
    return True


def _check_step(path: Path, meta: dict[str, str], step: int) -> None:
    if meta.get("step") != str(step):
        raise DiagError(path, f"metadata says step {meta.get('step')!r}, file name says {step}")


def step_ranges(steps: list[int]) -> str:
    """[3,4,5,9] -> '3-5, 9': compact enough for a one-line error."""
    out, run_start = [], None
    for i, s in enumerate(steps):
        run_start = s if run_start is None else run_start
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            out.append(str(s) if s == run_start else f"{run_start}-{s}")
            run_start = None
    return ", ".join(out)
