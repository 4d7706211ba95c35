"""run.json: what a run trained, with what loss, optimizer, clipping and precision.

Parsing is strict: a typo in a manifest would otherwise silently replay a different training
step, which is worse than no answer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from energydiag.errors import DiagError
from energydiag.io.layout import FORMAT, FORMAT_RANKS

AUTOCAST_DTYPES = (None, "bfloat16", "float16")
_KEYS = {
    "format",
    "model",
    "loss",
    "optimizer",
    "grad_clip",
    "autocast_dtype",
    "seed",
    "notes",
    "environment",
    "step",
    "scaler",
    "distributed",
    "parallelize",
}
# ddp/fsdp: the whole model is synchronised; none: every rank trains its own copy (a plain
# module under torch.distributed); mixed: some submodules wrapped in DDP/FSDP, the rest not.
PARALLELISM = ("ddp", "fsdp", "none", "mixed")
SYNC = ("ddp", "fsdp", "none")
_DISTRIBUTED_KEYS = {"world_size", "backend", "parallelism"}
_DISTRIBUTED_OPTIONAL = {"sync", "rank_checkpoints"}
SCALER_KEYS = {"init_scale", "growth_factor", "backoff_factor", "growth_interval"}


@dataclass(frozen=True)
class ModelSpec:
    """``target(**kwargs)`` builds the model; ``forward_kwargs`` go to every forward call."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    forward_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """A built-in loss by ``name`` or a plug-in by ``target`` (exactly one of them)."""

    name: str | None = None
    target: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.target or "?"

    @classmethod
    def from_mapping(cls, loss: Mapping[str, Any]) -> LossSpec:
        """As the manifest writes it: ``{"name" | "target": ..., "kwargs": {...}}``."""
        return cls(loss.get("name"), loss.get("target"), dict(loss.get("kwargs", {})))


@dataclass(frozen=True)
class OptimizerSpec:
    """``start_step``: the first step whose update is applied (a warm-up before it skips them)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    start_step: int = 0


@dataclass(frozen=True)
class Manifest:
    model: ModelSpec
    loss: LossSpec
    optimizer: OptimizerSpec
    grad_clip: float | None = None
    autocast_dtype: str | None = None
    seed: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    step: str | None = None
    scaler: dict[str, float] | None = None  # GradScaler settings when the run used one
    # {"world_size": W, "backend": "gloo"|"nccl", "parallelism": "ddp", "sync": {...}} for a
    # multi-rank run; "rank_checkpoints": every rank saved its own copy (parallelism none)
    distributed: dict[str, Any] | None = None
    # for FSDP: 'pkg.mod:fn', fn(model) shards a freshly built model as the run did
    parallelize: str | None = None
    format: str = FORMAT

    @property
    def world_size(self) -> int:
        return int(self.distributed["world_size"]) if self.distributed else 1

    @property
    def parallelism(self) -> str | None:
        return self.distributed["parallelism"] if self.distributed else None

    @property
    def rank_copies(self) -> bool:
        """Every rank trained its own copy: nothing keeps the ranks' parameters equal."""
        return self.parallelism == "none"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def parse_manifest(raw: Any, source: Path | str) -> Manifest:
    """A checked Manifest, or a one-line DiagError naming ``source`` and the first problem."""
    if not isinstance(raw, dict):
        raise DiagError(source, "must hold a JSON object")
    for ok, problem in _checks(raw):  # lazily: later checks rely on the earlier ones
        if not ok:
            raise DiagError(source, problem)
    return _build(raw)


def _checks(raw: dict[str, Any]) -> Iterator[tuple[bool, str]]:
    yield from _version_checks(raw)
    unknown = sorted(map(str, set(raw) - _KEYS))
    yield not unknown, f"unknown key(s) {', '.join(unknown)}"
    for key in ("model", "loss", "optimizer"):
        yield isinstance(raw.get(key), dict), f"missing or malformed key '{key}'"
    model, loss, opt = raw["model"], raw["loss"], raw["optimizer"]
    yield (
        import_string(model.get("target")),
        ("model.target must be an import string 'package.module:factory'"),
    )
    yield (
        (loss.get("name") is None) != (loss.get("target") is None),
        ("loss needs exactly one of 'name' (built-in) or 'target' (import string)"),
    )
    yield loss.get("name") is None or isinstance(loss["name"], str), "loss.name must be a string"
    yield (
        loss.get("target") is None or import_string(loss["target"]),
        ("loss.target must be an import string 'package.module:fn'"),
    )
    yield isinstance(opt.get("name"), str), "optimizer.name must be a torch.optim class name"
    start = opt.get("start_step", 0)
    yield _integer(start) and start >= 0, "optimizer.start_step must be a non-negative integer"
    clip = raw.get("grad_clip")
    yield (
        clip is None or (_number(clip) and clip > 0),
        "grad_clip must be a positive number or null",
    )
    yield (
        raw.get("autocast_dtype") in AUTOCAST_DTYPES,
        (f"autocast_dtype must be one of {AUTOCAST_DTYPES}"),
    )
    yield raw.get("seed") is None or _integer(raw["seed"]), "seed must be an integer or null"
    for part, name in ((model, "model"), (loss, "loss"), (opt, "optimizer")):
        yield isinstance(part.get("kwargs", {}), dict), f"{name}.kwargs must be an object"
    yield (
        isinstance(model.get("forward_kwargs", {}), dict),
        "model.forward_kwargs must be an object",
    )
    step = raw.get("step")
    yield (
        step is None or import_string(step),
        ("step must be an import string 'package.module:train_step' or null"),
    )
    scaler = raw.get("scaler")
    yield (
        scaler is None
        or (
            isinstance(scaler, dict)
            and set(scaler) <= SCALER_KEYS
            and all(_number(v) for v in scaler.values())
        ),
        f"scaler must be null or an object with numbers for {', '.join(sorted(SCALER_KEYS))}",
    )
    for key in ("notes", "environment"):
        yield isinstance(raw.get(key, {}), dict), f"{key} must be an object"


def _version_checks(raw: dict[str, Any]) -> Iterator[tuple[bool, str]]:
    """Version 2 is the multi-rank layout: it comes with a ``distributed`` entry, and only then."""
    yield (
        raw.get("format") in (FORMAT, FORMAT_RANKS),
        (f"unknown format version {raw.get('format')!r}"),
    )
    dist = raw.get("distributed")
    yield (
        dist is None or _distributed(dist),
        (
            "distributed must be null or an object with an integer world_size >= 1, a backend and "
            f"a parallelism ({', '.join(PARALLELISM)})"
        ),
    )
    sharded = isinstance(dist, dict) and dist.get("parallelism") == "fsdp"
    parallelize = raw.get("parallelize")
    yield (
        (parallelize is None and not sharded) or import_string(parallelize),
        "parallelize must be an import string 'package.module:fn' (required for an FSDP run)",
    )
    yield (
        (dist is None) == (raw.get("format") == FORMAT),
        (
            f"format {raw.get('format')!r} does not match distributed: a multi-rank run is "
            f"{FORMAT_RANKS!r}, a single-process one {FORMAT!r}"
        ),
    )


def _build(raw: dict[str, Any]) -> Manifest:
    model, loss, opt = raw["model"], raw["loss"], raw["optimizer"]
    clip, scaler = raw.get("grad_clip"), raw.get("scaler")
    return Manifest(
        model=ModelSpec(
            model["target"], dict(model.get("kwargs", {})), dict(model.get("forward_kwargs", {}))
        ),
        loss=LossSpec.from_mapping(loss),
        optimizer=OptimizerSpec(
            opt["name"], dict(opt.get("kwargs", {})), int(opt.get("start_step", 0))
        ),
        grad_clip=None if clip is None else float(clip),
        autocast_dtype=raw.get("autocast_dtype"),
        seed=raw.get("seed"),
        notes=dict(raw.get("notes", {})),
        environment=dict(raw.get("environment", {})),
        step=raw.get("step"),
        scaler=None if scaler is None else dict(scaler),
        distributed=None if raw.get("distributed") is None else dict(raw["distributed"]),
        parallelize=raw.get("parallelize"),
        format=raw["format"],
    )


_IMPORT = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def import_string(value: object) -> bool:
    """'package.module:name' and nothing else: no '..', no paths, no empty halves."""
    return isinstance(value, str) and len(value) < 500 and bool(_IMPORT.match(value))


def _distributed(value: object) -> bool:
    return (
        isinstance(value, dict)
        and _DISTRIBUTED_KEYS <= set(value) <= _DISTRIBUTED_KEYS | _DISTRIBUTED_OPTIONAL
        and _integer(value["world_size"])
        and 1 <= value["world_size"] <= 65536
        and isinstance(value["backend"], str)
        and value["parallelism"] in PARALLELISM
        and _sync(value.get("sync", {}))
        and isinstance(value.get("rank_checkpoints", False), bool)
    )


def _sync(value: object) -> bool:
    """Module path ('' for the rest of the model) -> how its parameters are kept equal."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and v in SYNC for k, v in value.items()
    )


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63


def _number(value: object) -> bool:
    return (_integer(value) or isinstance(value, float)) and math.isfinite(value)


def read_manifest(path: Path) -> Manifest:
    if not path.is_file():
        raise DiagError(path, "file not found (is this an energydiag run directory?)")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, RecursionError) as err:  # JSON, UTF-8, 4300-digit integers, nesting
        raise DiagError(path, f"not valid JSON ({str(err).splitlines()[0][:120]})") from None
    except OSError as err:
        raise DiagError(path, f"cannot be read ({err.strerror or err})") from None
    return parse_manifest(raw, path)
