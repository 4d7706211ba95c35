"""Exact, instrumented replay of a run's training steps from a checkpoint.

Two tiers keep it fast. Every step runs the run's own step function plus a cheap check: loss,
global gradient norm and parameter norm after the update, gathered into one tensor and synced
once. Only when that check fails is the state before the failing step rebuilt and the step re-run
under the instrument (energydiag.engine.localise). Quantities are measured every ``every`` steps.

The result also records what the replay could not have: optimizer state, RNG states, per-step
hyperparameters, and the differences between the recording machine and this one. Verdicts about
fidelity are made from these by the analysis layer, never here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from energydiag.engine import environment
from energydiag.engine.instrument import Instrument
from energydiag.engine.localise import Fault, localise
from energydiag.engine.quantities import DEFAULT, Quantity, columns
from energydiag.engine.ranks import collective_order, flagged_ranks, unwrap
from energydiag.engine.session import Session, open_session
from energydiag.engine.simulated import RanksInTurn
from energydiag.engine.tensorstats import exact_global_norm, global_norm, plain
from energydiag.errors import DiagError, OptionError, first_line
from energydiag.io.rundir import Batch, Run

if TYPE_CHECKING:
    import pandas as pd

Progress = Callable[[dict[str, Any], int], None]  # (step row, steps planned)
CHEAP = ("loss", "grad_norm", "param_norm")


@dataclass
class ReplayResult:
    checkpoint_step: int
    steps: list[dict[str, Any]]
    fault: Fault | None = None
    missing: dict[str, str] = field(default_factory=dict)  # kind of state -> what lacked it
    environment: list[str] = field(default_factory=list)
    nondeterministic: list[str] = field(default_factory=list)
    hyperparameters: dict[int, list] = field(default_factory=dict)  # as applied, step by step
    parameter_checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def table(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.steps)


def plan(run: Run, start: int, to_step: int | None) -> list[int]:
    """The contiguous logged steps to replay from checkpoint ``start`` through ``to_step``.

    Bounded by the batches that exist before anything is allocated.
    """
    logged = run.batch_steps
    if start not in set(logged):
        usable = run.checkpoints_with_batches
        nearest = min(usable, key=lambda s: abs(s - start), default=None)
        hint = f"; the nearest step you can replay from is {nearest}" if nearest is not None else ""
        raise DiagError(
            run.root / "batches",
            f"no batch logged for step {start} (the checkpoint's step){hint}",
        )
    if to_step is None:
        to_step = start
        have = set(logged)
        while to_step + 1 in have:
            to_step += 1
    if to_step < start:
        raise OptionError(f"is before the checkpoint at step {start}", "to_step", value=to_step)
    if to_step > logged[-1]:
        raise OptionError(
            f"the last logged batch is step {logged[-1]}",
            "to_step",
            value=to_step,
            path=run.root / "batches",
        )
    within = [s for s in logged if start <= s <= to_step]
    if len(within) != to_step - start + 1:
        gaps = _gaps(within, to_step)
        raise DiagError(run.root / "batches", f"missing batches for steps {gaps}")
    return within


def _gaps(within: list[int], stop: int) -> str:
    """Missing steps between logged ones, as ranges, without listing a huge range one by one."""
    out = []
    for a, b in zip(within, [*within[1:], stop + 1], strict=True):
        if b > a + 1:
            out.append(str(a + 1) if b == a + 2 else f"{a + 1}-{b - 1}")
    return ", ".join(out[:5]) + (f" and {len(out) - 5} more gap(s)" if len(out) > 5 else "")


def replay(
    run: Run,
    from_step: int,
    to_step: int | None = None,
    device: torch.device | None = None,
    every: int = 0,
    progress: Progress | None = None,
    quantities: tuple[type[Quantity], ...] = DEFAULT,
) -> ReplayResult:
    """Replay from the checkpoint at or before ``from_step``; stop at the first non-finite value."""
    if to_step is not None and to_step < from_step:
        raise OptionError(f"is before the first step {from_step}", "to_step", value=to_step)
    device = device or torch.device("cpu")
    recorded = run.manifest.environment
    result = ReplayResult(run.checkpoint_at_or_before(from_step), [])
    with environment.recorded_threads(recorded), environment.deterministic(result.nondeterministic):
        session = open_session(run, from_step, device)
        logged = run.logged()
        result.environment = environment.differences(recorded, environment.capture(device))
        result.environment += collective_order(run.manifest.distributed, _played(session))
        checkpoints = set(run.checkpoint_steps)
        steps = plan(run, session.step, to_step)
        for step in steps:
            batch = run.batch(step)
            _note_missing(result, session, batch)
            if batch.hyperparameters is not None:
                result.hyperparameters[step] = batch.hyperparameters
            measure = quantities if every > 0 and step % every == 0 else ()
            row = run_step(session, batch, measure)
            row["logged_loss"] = logged.get(step)
            result.steps.append(row)
            if progress:
                progress(row, len(steps))
            if flagged_ranks(not row["finite"]):  # every rank stops and localises together
                result.fault = locate(run, step, device, expected=not row["finite"])
                break
            if step + 1 in checkpoints:
                result.parameter_checks.append(compare_parameters(run, step + 1, session))
    return result


def _note_missing(result: ReplayResult, session: Session, batch: Batch) -> None:
    """What this replay lacks compared with the recording; each noted once."""
    absent = {}
    if batch.step == session.step and not session.optimizer_state:
        absent["optimizer"] = (
            f"optimizer state (checkpoint {session.step} holds none: it starts fresh)"
        )
    if not batch.rng:
        absent["rng"] = f"RNG state (batch {batch.step} holds none: dropout will differ)"
    if batch.hyperparameters is None:
        absent["hyperparameters"] = (
            f"per-step hyperparameters (batch {batch.step}: the checkpoint's lr is used)"
        )
    for kind, item in absent.items():
        result.missing.setdefault(kind, item)  # the first step that lacked it is said


def run_step(
    session: Session,
    batch: Batch,
    quantities: tuple[type[Quantity], ...] = (),
    update: bool | None = None,
) -> dict[str, Any]:
    """One real training step plus the cheap check (one host sync), and any quantities."""
    measured = [q() for q in quantities]
    for q in measured:
        q.before(session.model)
    observers = [o for o in (q.observer() for q in measured) if o is not None]
    observe = (lambda: Instrument(observers).attached(model=session.model)) if observers else None
    scale = session.scaler.get_scale() if session.scaler else None
    try:
        result = session.train(batch, observe=observe, update=update)
    except Exception as err:  # the user's step raised: a fault to localise, not a crash
        row = {"step": batch.step, "finite": False, "exception": first_line(err)}
        return row | dict.fromkeys(CHEAP, math.nan)
    params = [p.detach() for p in session.model.parameters()]
    scalars: dict[str, Any] = {
        "loss": result.loss.float(),
        "grad_norm": result.grad_norm.float(),
        "param_norm": global_norm(params).float(),
    }
    for q in measured:
        scalars |= q.compute(session.model, result, session.loss_kwargs)
    row = {"step": batch.step, **_synced(scalars, result.loss.device)}
    row["finite"] = all(math.isfinite(row[k]) for k in CHEAP)
    if scale is not None:
        _note_scaler(row, scale, session.scaler.get_scale())
    if not math.isfinite(row["param_norm"]):  # finite weights may overflow a float32 norm
        row["param_norm_overflows_fp32"] = True
        row["param_norm"] = exact_global_norm(params)
    return row


def _note_scaler(row: dict[str, Any], before: float, after: float) -> None:
    """A GradScaler that lowered its scale skipped the step: overflowing gradients are then
    expected, not a failure. The loss and the parameters must still be finite."""
    row["scale"], row["skipped"] = before, after < before
    if row["skipped"]:
        row["finite"] = math.isfinite(row["loss"]) and math.isfinite(row["param_norm"])


def _synced(scalars: dict[str, Any], device: torch.device) -> dict[str, float]:
    names = [k for k, v in scalars.items() if isinstance(v, torch.Tensor)]
    values = (
        torch.stack([scalars[n].to(device).double().reshape(()) for n in names]).tolist()
        if names
        else []
    )
    plain = {k: float(v) for k, v in scalars.items() if not isinstance(v, torch.Tensor)}
    return dict(zip(names, values, strict=True)) | plain


def compare_parameters(run: Run, step: int, session: Session) -> dict[str, Any]:
    """How far the replayed parameters are from the recorded checkpoint at ``step``."""
    recorded = run.checkpoint(step).model
    diffs = [
        (name, float((plain(t.detach()).cpu().double() - recorded[name].double()).abs().max()))
        for name, t in unwrap(session.model).state_dict().items()
        if name in recorded and t.is_floating_point() and t.numel()
    ]
    worst = max(diffs, key=lambda d: d[1] if math.isfinite(d[1]) else math.inf, default=("", 0.0))
    return {"step": step, "max_abs_diff": worst[1], "worst": worst[0]}


def state_before(run: Run, step: int, device: torch.device) -> Session:
    """The exact state before ``step``: load the checkpoint at or before it, replay up to it."""
    session = open_session(run, step, device)
    if step > session.step:
        for s in plan(run, session.step, step - 1):
            session.train(run.batch(s))
    session.step = step
    return session


def locate(run: Run, step: int, device: torch.device, expected: bool = True) -> Fault | None:
    """Localise the failure at ``step`` from a rebuilt pre-step state; say if it reproduces.

    ``expected``: this rank's own cheap check failed. A rank that stopped only because another
    one failed reports a fault only when its re-run finds one.
    """
    with environment.recorded_threads(run.manifest.environment):
        session = state_before(run, step, device)
        fault = localise(session, run.batch(step))
    if fault is None and not expected:
        return None
    if fault is None:
        return Fault(
            step,
            "unknown",
            "the cheap check failed but the instrumented re-run of the same inputs was finite: "
            "the fault did not reproduce (non-determinism or a transient hardware fault)",
            reproduced=False,
        )
    fault.reproduced = True
    if isinstance(session.step_fn, RanksInTurn):  # the micro-batch was a recorded rank's
        rank = session.step_fn.rank_of(fault.micro_batch)
        if rank is not None:
            fault.rank, fault.micro_batch = rank, None
    return fault


def _played(session: Session) -> int:
    """How many recorded ranks this process plays each step."""
    return len(session.step_fn.runs) if isinstance(session.step_fn, RanksInTurn) else 1


def replay_columns(
    steps: list[dict[str, Any]], quantities: tuple[type[Quantity], ...]
) -> dict[str, Any]:
    """Labels and formats for renderers, for the columns these rows hold (a model without
    energies gets no energy column)."""
    held = set().union(*steps) if steps else set()
    return {
        k: {"label": label, "format": fmt}
        for k, (label, fmt) in columns(quantities).items()
        if k in held
    }
