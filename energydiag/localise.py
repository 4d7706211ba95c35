"""The deep tier of replay: re-run one failing step fully instrumented and say where it broke.

Phases are checked in the order a step runs them: data, forward, backward, clip, optimizer.
The re-run starts from the same state with the same inputs and RNG, and the probe only reads, so
what it sees is what happened.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from energydiag.probe import ModuleEvent, OpEvent, Probe, all_finite, summarize
from energydiag.run import Batch
from energydiag.session import Session
from energydiag.state import restore_rng
from energydiag.step import clip, forward

PHASES = ("data", "forward", "backward", "clip", "optimizer")


@dataclass
class Fault:
    step: int
    phase: str
    summary: str
    module: str | None = None
    module_kind: str | None = None
    op: OpEvent | None = None
    tensor: str | None = None
    sample: int | None = None
    parameters: list[str] = field(default_factory=list)
    optimizer_state: dict[str, dict[str, float]] = field(default_factory=dict)
    exception: str | None = None
    all_masked_samples: list[int] = field(default_factory=list)
    reproduced: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def all_masked_samples(batch: dict[str, torch.Tensor]) -> list[int]:
    mask = batch.get("pad_mask")
    if mask is None or mask.dtype != torch.bool:
        return []
    return torch.nonzero(mask.all(dim=1)).flatten().tolist()


def check_data(step: int, batch: dict[str, torch.Tensor]) -> Fault | None:
    for key, t in batch.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = ~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)
            sample = int(torch.nonzero(bad)[0])
            s = summarize(t)
            return Fault(
                step,
                "data",
                f"batch tensor '{key}' is non-finite in sample {sample} ({s.describe()})",
                tensor=key,
                sample=sample,
            )
    return None


def localise(session: Session, batch: Batch) -> Fault | None:
    """Run ``batch`` on the session's current (pre-step) state, instrumented; None if it is clean."""
    data = session.batch_on_device(batch)
    fault = check_data(batch.step, data)
    if fault:
        return fault
    rerun = _Rerun(session, batch.step, data)
    restore_rng(batch.rng)
    session.optimizer.zero_grad(set_to_none=True)
    phases = (
        ("forward", rerun.forward),
        ("backward", rerun.backward),
        ("clip", rerun.clip),
        ("optimizer", rerun.update),
    )
    for phase, check in phases:
        try:
            fault = check()
        except Exception as err:  # a user model that guards itself raises instead of returning NaN
            return _raised(rerun, phase, err)
        if fault:
            return fault
    return None


class _Rerun:
    """One step's phases, each returning a Fault when its output is the first non-finite one."""

    def __init__(self, session: Session, step: int, data: dict[str, torch.Tensor]) -> None:
        self.session, self.step, self.data = session, step, data
        self.model = session.model
        self.probe = Probe(self.model, detail="flags")
        self.masked = all_masked_samples(data)
        self.loss = torch.zeros(())

    def forward(self) -> Fault | None:
        with self.probe.attached():
            self.loss, _ = forward(
                self.model,
                self.session.loss_fn,
                self.data,
                self.session.device,
                self.session.autocast_dtype,
            )
        if torch.isfinite(self.loss).all():
            return None
        module: ModuleEvent | None = self.probe.modules.first_faulty()
        op = self.probe.ops.origin(module.path if module else None)
        where = f"'{module.path}' ({module.kind})" if module else "the loss"
        how = f" at {op.op}" if op else ""
        return Fault(
            self.step,
            "forward",
            f"the forward pass went non-finite in {where}{how}",
            module=module.path if module else None,
            module_kind=module.kind if module else None,
            op=op,
            all_masked_samples=self.masked,
        )

    def backward(self) -> Fault | None:
        with self.probe.attached():
            self.loss.backward()
        bad = _nonfinite(self.model, grads=True)
        if not bad:
            return None
        op = self.probe.ops.origin(phase="backward")
        where = f" in {op.op} ({op.autograd_node})" if op else ""
        return Fault(
            self.step,
            "backward",
            f"gradients became non-finite{where}; first parameter: {bad[0]}",
            op=op,
            parameters=bad,
        )

    def clip(self) -> Fault | None:
        norm = clip(self.model, self.session.grad_clip)
        bad = _nonfinite(self.model, grads=True)
        if not bad:
            return None
        return Fault(
            self.step,
            "clip",
            f"gradient clipping made gradients non-finite (total norm {float(norm):.4g})",
            parameters=bad,
        )

    def update(self) -> Fault | None:
        if self.step < self.session.run.manifest.optimizer.start_step:
            return None  # still in the warm-up: the run did not update here
        self.session.optimizer.step()
        bad = _nonfinite(self.model, grads=False)
        if not bad:
            return None
        return Fault(
            self.step,
            "optimizer",
            f"the optimizer update made '{bad[0]}' non-finite from finite gradients",
            parameters=bad,
            optimizer_state=_optimizer_evidence(self.session, bad),
        )


def _raised(rerun: _Rerun, phase: str, err: Exception) -> Fault:
    stack = rerun.probe.modules.stack
    text = str(err).strip().splitlines()
    message = f"{type(err).__name__}: {text[0] if text else ''}"
    return Fault(
        rerun.step,
        phase,
        f"the {phase} phase raised {message}",
        module=stack[-1] if stack else None,
        exception=message,
        all_masked_samples=rerun.masked,
    )


def _nonfinite(model: torch.nn.Module, grads: bool) -> list[str]:
    named = [(n, p.grad if grads else p.detach()) for n, p in model.named_parameters()]
    named = [(n, t) for n, t in named if t is not None]
    if all_finite([t for _, t in named]):
        return []
    return [n for n, t in named if not torch.isfinite(t).all()]


def _optimizer_evidence(session: Session, names: list[str]) -> dict[str, dict[str, float]]:
    params = dict(session.model.named_parameters())
    evidence = {}
    for name in names[:3]:
        p = params[name]
        group = next(g for g in session.optimizer.param_groups if any(q is p for q in g["params"]))
        state = session.optimizer.state.get(p, {})
        entry = {
            "grad_abs_max": float(p.grad.abs().max()) if p.grad is not None else float("nan"),
            "lr": float(group.get("lr", float("nan"))),
            "eps": float(group.get("eps", float("nan"))),
        }
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                entry[f"{key}_min"] = float(value.min())
                entry[f"{key}_abs_max"] = float(value.abs().max())
        evidence[name] = entry
    return evidence
