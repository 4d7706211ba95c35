"""The notation of a proposed fix: "tau=3", "head=softplus", "lr*=0.1", "lr=1e-4", "clip=0.5",
"clip=none", "margin=1", "warmup=10", "center=h", "batch*=3", and for a multi-rank run "ddp"
(the recorded ranks' gradients averaged on one model) or "gather=all" (their batches joined:
every rank's actions as negatives), or several joined by commas
("head=softplus,tau=1"). Findings name the variant that would verify them in this notation, and
``whatif`` replays it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from energydiag.errors import OptionError
from energydiag.reference.models import HEADS

LOSS_KNOBS = ("tau", "margin")
SETTINGS = (
    "tau",
    "margin",
    "head",
    "lr",
    "lr*",
    "batch*",
    "clip",
    "warmup",
    "center",
    "ddp",
    "gather",
)
RANK_MODES = ("ddp", "gather")


@dataclass
class Variant:
    label: str
    loss: dict[str, float] = field(default_factory=dict)
    head: str | None = None
    lr: float | None = None
    lr_scale: float = 1.0
    clip: float | None | str = "unchanged"
    warmup: int = 0
    center: list[str] = field(default_factory=list)  # batch tensors re-centred per feature
    batch_scale: int = 1  # each step also sees the next k-1 logged batches: k·B candidates
    ranks: str | None = None  # "ddp" | "gather": how one process plays the recorded ranks


def parse_variant(text: str) -> Variant:
    """'tau=3,lr*=0.1' -> Variant; a one-line DiagError for anything else."""
    variant = Variant(text)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, op, value = _split(part)
        try:
            _apply_setting(variant, key, op, value)
        except ValueError:
            raise OptionError(
                f"cannot use {value!r} for {key}", "tries", value=repr(text)
            ) from None
    return variant


def _split(part: str) -> tuple[str, str, str]:
    if part == "ddp":
        return "ddp", "=", "on"
    for op in ("*=", "="):
        if op in part:
            key, value = part.split(op, 1)
            return key.strip(), op, value.strip()
    raise OptionError("expected key=value or lr*=factor", "tries", value=repr(part))


def _apply_setting(v: Variant, key: str, op: str, value: str) -> None:
    if key == "lr" and op == "*=":
        v.lr_scale = float(value)
    elif key == "batch" and op == "*=":
        v.batch_scale = int(value)
        if v.batch_scale < 1:
            raise ValueError(value)
    elif op == "*=":
        raise OptionError(f"only lr and batch can be scaled with *= (got {key}*=)", "tries")
    elif key in LOSS_KNOBS:
        v.loss[key] = float(value)
    elif key == "lr":
        v.lr = float(value)
    elif key == "clip":
        v.clip = None if value.lower() in ("none", "off", "0") else float(value)
    elif key == "warmup":
        v.warmup = int(value)
    elif key == "ddp" and value == "on":
        v.ranks = "ddp"
    elif key == "gather" and value == "all":
        v.ranks = "gather"
    elif key in RANK_MODES:
        raise ValueError(value)
    elif key == "center":
        v.center.append(value)
    elif key == "head":
        if value not in HEADS:
            raise OptionError(f"choose one of {', '.join(HEADS)}", "tries", value=f"head={value}")
        v.head = value
    else:
        raise OptionError(f"unknown setting {key!r} (one of {', '.join(SETTINGS)})", "tries")
