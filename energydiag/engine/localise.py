"""The deep tier of replay: re-run one failing step under the instrument and say where it broke.

The step runs once, exactly as recorded (any step function), with the ``Origins`` observer
noting every op where a NaN or Inf began. Afterwards two questions are answered separately:
where the fault *surfaced* (loss, then gradients, then the gradient norm, then the parameters:
forward, backward, clip, optimizer) and where it *began* (the first op that produced it, with its
module from ModuleTracker, its phase and micro-batch). They differ in the torch.where trap: the
NaN begins in a forward branch that ``where`` discards and surfaces in the gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from energydiag.engine.instrument import (
    BACKWARD,
    CLIP,
    FORWARD,
    OPTIMIZER,
    Instrument,
    resolve_phase,
)
from energydiag.engine.observers import OpEvent, Origins
from energydiag.engine.ranks import flagged_ranks
from energydiag.engine.session import Session
from energydiag.engine.step import StepResult, run_step_fn
from energydiag.engine.tensorstats import (
    all_finite,
    exact_global_norm,
    global_norm,
    local,
    summarize,
)
from energydiag.errors import first_line
from energydiag.io.rundir import Batch
from energydiag.io.state import plain_key
from energydiag.schema import Record

PHASES = ("state", "data", FORWARD, BACKWARD, CLIP, OPTIMIZER)


@dataclass
class Fault(Record):
    step: int
    phase: str
    summary: str
    module: str | None = None
    op: OpEvent | None = None
    micro_batch: int | None = None
    tensor: str | None = None
    sample: int | None = None
    parameters: list[str] = field(default_factory=list)
    largest: dict[str, float] = field(default_factory=dict)
    optimizer_state: dict[str, dict[str, float]] = field(default_factory=dict)
    exception: str | None = None
    masked_by_where: bool = False
    all_masked_samples: list[int] = field(default_factory=list)
    reproduced: bool | None = None
    notes: list[str] = field(default_factory=list)
    rank: int | None = None  # in a multi-rank replay, the rank whose values went non-finite


def all_masked_samples(batch: dict[str, torch.Tensor]) -> list[int]:
    mask = batch.get("pad_mask")
    if mask is None or mask.dtype != torch.bool or mask.dim() != 2:
        return []
    return torch.nonzero(mask.all(dim=1)).flatten().tolist()


def check_data(step: int, batch: dict[str, torch.Tensor]) -> Fault | None:
    for key, t in batch.items():
        if t.is_floating_point() and not all_finite([t]):
            bad = ~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)
            sample = int(torch.nonzero(bad)[0])
            return Fault(
                step,
                "data",
                f"batch tensor '{key}' is non-finite in sample {sample} ({summarize(t).describe()})",
                tensor=key,
                sample=sample,
            )
    return None


def check_state(step: int, model: nn.Module) -> Fault | None:
    bad = _nonfinite(model, grads=False)
    if not bad:
        return None
    return Fault(
        step,
        "state",
        f"the parameters were already non-finite before the step: {bad[0]}",
        parameters=bad,
    )


def localise(session: Session, batch: Batch) -> Fault | None:
    """Run ``batch`` on the session's current (pre-step) state, instrumented; None if clean."""
    data = session.prepare(batch)
    fault = check_state(batch.step, session.model) or check_data(batch.step, data)
    if flagged_ranks(fault is not None):  # ranks skip the re-run together, or none does
        return fault
    origins = Origins()
    instrument = Instrument([origins])
    ctx = session.context(batch, clock=instrument.clock)
    masked = all_masked_samples(data)
    # A torch.compile'd model is observed op by op through the module it wraps (same parameters).
    model = getattr(session.model, "_orig_mod", session.model)
    with instrument.attached(session.optimizer, session.model):
        try:
            result = run_step_fn(session.step_fn, model, session.optimizer, data, ctx)
        except Exception as err:  # a model that guards itself raises instead of returning NaN
            return _compiled_note(_raised(batch.step, instrument, origins, err, masked), session)
    _resolve_phases(origins.events, instrument.clock.backwards)
    surfaced = _surfaced(result, session.model)
    if surfaced is None:
        return None
    fault = _located(batch.step, surfaced, origins, session)
    fault.all_masked_samples = masked
    return _compiled_note(fault, session)


def _compiled_note(fault: Fault, session: Session) -> Fault:
    if hasattr(session.model, "_orig_mod"):
        fault.notes.append("the model is torch.compile'd: the deep tier ran it eagerly, op by op")
    return fault


def _surfaced(result: StepResult, model: nn.Module) -> str | None:
    """The first checked quantity that is non-finite, in the order a step produces them."""
    if not math.isfinite(float(result.loss)):
        return FORWARD
    if _nonfinite(model, grads=True):
        return BACKWARD
    if not math.isfinite(float(result.grad_norm)):
        return CLIP
    params = [local(p.detach()) for p in model.parameters()]
    if not all_finite(params) or not math.isfinite(float(global_norm(params))):
        return OPTIMIZER
    return None


def _resolve_phases(events: list[OpEvent], backwards: int) -> None:
    for e in events:
        e.phase = resolve_phase(e.phase, e.micro_batch, backwards)


def _located(step: int, surfaced: str, origins: Origins, session: Session) -> Fault:
    events = origins.meaningful()
    latent = [e for e in events if e.phase == FORWARD]
    first = next((e for e in events if e.phase == surfaced), None)
    if surfaced == BACKWARD and latent and (origins.masked or first is None):
        first = latent[0]  # the forward NaN that where() hid: its gradient is the NaN
    per_micro_batch = first is not None and first.phase in (FORWARD, BACKWARD)
    fault = Fault(
        step,
        surfaced,
        f"the {surfaced} phase went non-finite{_where(first, session.model, surfaced)}",
        module=(first.module or None) if per_micro_batch else None,
        op=first,
        micro_batch=first.micro_batch if per_micro_batch else None,
        # the trap: a forward NaN that where() discarded, surfacing only in the gradients
        masked_by_where=surfaced == BACKWARD and bool(origins.masked) and first in latent,
    )
    if surfaced in (BACKWARD, CLIP):
        fault.parameters = _nonfinite(session.model, grads=True)
        fault.largest = _largest(session.model, grads=True)
    if surfaced == OPTIMIZER:
        fault.parameters = _nonfinite(session.model, grads=False) or list(
            _largest(session.model, grads=False)
        )
        fault.largest = _largest(session.model, grads=False)
        fault.optimizer_state = _optimizer_evidence(session, fault.parameters)
        if first is None and not _nonfinite(session.model, grads=False):
            name, peak = next(iter(fault.largest.items()))
            norm = exact_global_norm([p.detach() for p in session.model.parameters()])
            fault.summary = (
                f"the update left every parameter finite, but their norm ({norm:.3g}) overflows "
                f"float32: largest |w| {peak:.3g} in '{name}'"
            )
        elif first is None:
            fault.summary = f"the optimizer update made '{fault.parameters[0]}' non-finite"
    elif surfaced == CLIP and first is not None:
        name, peak = next(iter(fault.largest.items()), ("?", math.nan))
        fault.summary = (
            f"every gradient is finite, but their norm overflows in {first.op} "
            f"(largest |g| {peak:.3g} in '{name}')"
        )
    return fault


def _where(first: OpEvent | None, model: nn.Module, surfaced: str) -> str:
    """' at aten::op in 'module'' in forward and backward; the parameter it wrote otherwise."""
    if first is None:
        return ""
    if first.phase in (FORWARD, BACKWARD):
        return f" at {first.op} in '{first.module or '<loss>'}'"
    broken = _nonfinite(model, grads=surfaced != OPTIMIZER)
    return f" at {first.op}" + (f" updating '{broken[0]}'" if broken else "")


def _raised(
    step: int, instrument: Instrument, origins: Origins, err: Exception, masked: list[int]
) -> Fault:
    """The guard's message, where it raised, and the op whose non-finite output it caught."""
    message = first_line(err)
    clock = instrument.clock
    phase = resolve_phase(clock.current(), clock.micro_batch, clock.backwards)
    _resolve_phases(origins.events, clock.backwards)
    caught = next(iter(origins.meaningful()), None)
    module = instrument.module() or None
    return Fault(
        step,
        phase,
        f"the {phase} phase raised {message}"
        + (
            f"; the first non-finite value came from {caught.op} in '{caught.module}'"
            if caught
            else ""
        ),
        module=caught.module if caught else module,
        op=caught,
        micro_batch=caught.micro_batch if caught else None,
        exception=message,
        all_masked_samples=masked,
    )


def _nonfinite(model: nn.Module, grads: bool) -> list[str]:
    named = [(plain_key(n), p.grad if grads else p.detach()) for n, p in model.named_parameters()]
    named = [(n, local(t)) for n, t in named if t is not None]
    if all_finite([t for _, t in named]):
        return []
    return [n for n, t in named if not torch.isfinite(t).all()]


def _largest(model: nn.Module, grads: bool, top: int = 3) -> dict[str, float]:
    """The parameters (or gradients) with the largest finite |value|: who drives a norm up."""
    peaks = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is not None and local(t).numel():
            peaks[plain_key(name)] = summarize(local(t)).max_abs
    ranked = sorted(peaks.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else 0.0)
    return dict(ranked[:top])


def _optimizer_evidence(session: Session, names: list[str]) -> dict[str, dict[str, float]]:
    params = {plain_key(n): p for n, p in session.model.named_parameters()}
    evidence = {}
    for name in names[:3]:
        p = params[name]
        group = next(g for g in session.optimizer.param_groups if any(q is p for q in g["params"]))
        entry = {
            "grad_abs_max": summarize(local(p.grad)).max_abs if p.grad is not None else math.nan,
            "lr": float(group.get("lr", math.nan)),
            "eps": float(group.get("eps", math.nan)),
        }
        for key, value in session.optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and local(value).numel() > 1:
                s = summarize(local(value))
                entry[f"{key}_min"], entry[f"{key}_abs_max"] = s.min, s.max_abs
        evidence[name] = entry
    return evidence
