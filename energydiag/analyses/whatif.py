"""Counterfactual replays: the same K logged batches from the same checkpoint, once per proposed
fix, changing only what the fix names (a ``Variant``). Turns a list of guesses into a ranking.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from energydiag import findings as rules
from energydiag.analyses.variants import Variant
from energydiag.contrastive.head import find_head, head_module
from energydiag.contrastive.quantities import STANDARD
from energydiag.engine.quantities import layer_of
from energydiag.engine.replay import plan, run_step
from energydiag.engine.session import Session, open_session
from energydiag.engine.simulated import joined, played_ranks
from energydiag.errors import DiagError, OptionError
from energydiag.io.rundir import Batch, Run
from energydiag.reference.models import make_head
from energydiag.schema import Report, report


@dataclass
class VariantResult:
    label: str
    losses: list[float]
    lrs: list[float]  # the first param group's lr as applied at each replayed step
    candidates: int  # B: the in-batch candidates each positive is scored against
    loss_start: float | None
    loss_end: float | None
    relative_drop: float | None  # None when the variant went non-finite or raised
    energy_span: float | None
    logit_spread: float | None
    saturation: float | None
    input_layer_grad_norm: float | None
    finite: bool
    exception: str | None = None
    failed_at: int | None = None
    rank: int = 0


@report("whatif")
@dataclass
class WhatifReport(Report):
    from_step: int
    steps: int
    input_layer: str
    head_path: str | None
    results: list[VariantResult]
    findings: list[rules.Finding] = field(default_factory=list)

    @property
    def baseline(self) -> VariantResult:
        return next(r for r in self.results if r.label == "baseline")


def whatif(
    run: Run,
    from_step: int,
    steps: int,
    variants: list[Variant],
    device: torch.device | None = None,
    head_path: str | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> WhatifReport:
    """Each variant replays the same logged steps from the same checkpoint, fully measured."""
    device = device or torch.device("cpu")
    if steps < 1:
        raise OptionError("replay at least one step", "steps", value=steps)
    start = run.checkpoint_at_or_before(from_step)
    window = plan(run, start, start + steps - 1)
    batches = [run.batch(s) for s in window]
    _check_inputs(variants, batches[0].tensors)
    _check_ranks(run, variants)
    swap = _head_to_swap(run, start, device, head_path, batches[0], variants)
    results = []
    for variant in [Variant("baseline"), *variants]:
        session = open_session(run, start, device, **variant.loss)
        _apply(variant, session, swap)
        rows = []
        for i, batch in enumerate(batches):
            in_warmup = i < variant.warmup or batch.step < run.manifest.optimizer.start_step
            in_warmup = in_warmup or batch.step in run.skipped_steps  # skipped as recorded
            batch = _widened(batches, i, variant.batch_scale)
            rows.append(run_step(session, batch, STANDARD, update=not in_warmup))
            rows[-1]["lr"] = float(session.optimizer.param_groups[0]["lr"])
            if progress:
                progress(variant.label, batch.step)
            if not rows[-1]["finite"]:
                break
        width = _candidates(run, batches[0], variant)
        results.append(_summarise(variant.label, rows, _input_layer(session.model), width))
    _rank(results)
    report = WhatifReport(start, len(batches), _input_layer(session.model), swap, results)
    as_dicts = [asdict(r) for r in results]
    report.findings = rules.ranked(
        [rules.whatif_failures(as_dicts), rules.whatif_ranking(as_dicts)]
    )
    return report


def _head_to_swap(run, start, device, override, batch, variants) -> str | None:
    """The module ``head=`` replaces, checked before anything is replayed."""
    if not any(v.head for v in variants):
        return override
    model = open_session(run, start, device).model
    if override is None:
        try:
            found = find_head(model, batch.on(device))
        except DiagError:  # a damaged file is named, not mistaken for a headless model
            raise
        except Exception:  # a model that raises on the batch: the user names the head
            found = None
        override = head_module(model, found, None)
        if override is None:
            raise OptionError("no bounded head module found to swap: name its module", "head_path")
    if override not in dict(model.named_modules()):
        raise OptionError("the model has no such module", "head_path", value=repr(override))
    return override


def _apply(v: Variant, session: Session, head_path: str | None) -> None:
    if v.head and head_path:
        _swap_module(session.model, head_path, make_head(v.head).to(session.device))
    if v.lr is not None or v.lr_scale != 1.0:
        session.adjust_hyperparameters = functools.partial(_variant_lr, v)
    if v.clip != "unchanged":
        session.grad_clip = v.clip
    if v.center:
        session.transform_batch = functools.partial(_centred, v.center)
    if v.ranks:  # one process plays every recorded rank
        session.play_ranks(played_ranks(session.run, 1, 0), together=v.ranks == "gather")


def _widened(batches: list[Batch], i: int, k: int) -> Batch:
    """Step i's batch with the next k-1 logged batches of the window appended (wrapping round):
    k·B contexts and actions, so each positive meets k·B - 1 negatives, from the same data."""
    if k == 1:
        return batches[i]
    return joined([batches[(i + j) % len(batches)] for j in range(k)])


def _candidates(run: Run, batch: Batch, v: Variant) -> int:
    """The in-batch candidates each positive meets under the variant (0: not an energy batch)."""
    if "h" not in batch.tensors:
        return 0
    joined = run.manifest.world_size if v.ranks == "gather" else 1
    return batch.size * v.batch_scale * joined


def _check_ranks(run: Run, variants: list[Variant]) -> None:
    """A variant that plays the recorded ranks needs several, and ``ddp`` a run without it."""
    for v in (v for v in variants if v.ranks):
        if run.manifest.world_size < 2:
            raise OptionError("the run was recorded by one process", "tries", value=v.label)
        if v.ranks == "ddp" and run.manifest.parallelism == "ddp":
            raise OptionError(
                "the run already averages its gradients with DDP", "tries", value=v.label
            )


def _check_inputs(variants: list[Variant], tensors: dict[str, torch.Tensor]) -> None:
    """Before anything is replayed: every input a variant re-centres is a float batch tensor,
    and a widened batch has contexts to count its rows by."""
    for v in variants:
        missing = [k for k in v.center if k not in tensors or not tensors[k].is_floating_point()]
        if missing:
            raise OptionError(
                "the batch has no such float tensor", "tries", value=f"center={missing[0]}"
            )
        if v.batch_scale > 1 and "h" not in tensors:
            raise OptionError(
                "the batch has no contexts 'h'", "tries", value=f"batch*={v.batch_scale}"
            )


def _centred(keys: list[str], data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each named input minus its per-feature mean over the batch (features = last dim): the
    input as a normalisation in front of the model would have given it."""
    out = dict(data)
    for key in keys:
        x = data[key]
        out[key] = x - x.reshape(-1, x.shape[-1]).mean(0)
    return out


def _variant_lr(v: Variant, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The variant's lr on top of each step's recorded schedule: ``lr=`` replaces it, ``lr*=``
    scales the recorded value of that very step (a warm-up stays a warm-up, only smaller)."""
    return [g | {"lr": (v.lr if v.lr is not None else g["lr"]) * v.lr_scale} for g in groups]


def _swap_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _input_layer(model: nn.Module) -> str:
    """The first parameterised layer: how much gradient reaches the bottom of the network."""
    return layer_of(next(n for n, _ in model.named_parameters()))


def _summarise(
    label: str, rows: list[dict[str, Any]], input_layer: str, candidates: int
) -> VariantResult:
    finite_rows = [r for r in rows if r["finite"]]
    losses = [r["loss"] for r in finite_rows]
    k = max(1, len(losses) // 5)
    start = statistics.fmean(losses[:k]) if losses else None
    end = statistics.fmean(losses[-k:]) if losses else None
    finite = len(finite_rows) == len(rows)
    last = finite_rows[-1] if finite_rows else {}
    span = last["energy_max"] - last["energy_min"] if "energy_max" in last else None
    drop = (start - end) / abs(start) if finite and start else None
    return VariantResult(
        label,
        losses,
        [r["lr"] for r in rows if "lr" in r],
        candidates,
        start,
        end,
        drop,
        span,
        last.get("logit_spread"),
        last.get("saturation"),
        last.get(f"grad_norm/{input_layer}"),
        finite,
        rows[-1].get("exception"),
        None if finite else rows[-1]["step"],
    )


def _rank(results: list[VariantResult]) -> None:
    """Finite before non-finite, then by relative loss drop (comparable across tau values)."""
    order = sorted(results, key=lambda r: (not r.finite, -(r.relative_drop or 0.0)))
    for rank, r in enumerate(order, start=1):
        r.rank = rank
