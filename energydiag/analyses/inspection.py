"""What is in a checkpoint, and what the energy model does on a batch.

Two parts. The checkpoint part streams the file one tensor at a time (analyses.checkpoint_stats)
and flags non-finite values, exploded-but-finite layers (on their own, and against the run's
first checkpoint when there is a run), Adam blow-up risk and autocast overflow. The batch part
runs the run's real forward and backward under the instrument and measures what explains a
stalled contrastive loss: energy range, logit spread, loss bounds, retrieval, saturation, the
head's bound (found by what the model does), activations and gradient norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from energydiag import findings as rules
from energydiag.analyses.checkpoint_report import CheckpointReport, checkpoint_report
from energydiag.analyses.schedule import schedule_causes, schedule_evidence
from energydiag.contrastive import doctor
from energydiag.contrastive.bounds import infonce_bounds, scored_candidates
from energydiag.contrastive.head import Head, find_head
from energydiag.contrastive.quantities import energy_stats, scored_energies
from energydiag.contrastive.tau import Tau, resolve_tau
from energydiag.engine.activations import ModuleOutputs
from energydiag.engine.instrument import Instrument
from energydiag.engine.localise import all_masked_samples
from energydiag.engine.observers import SaturationCounter
from energydiag.engine.plugins import LossFn
from energydiag.engine.probe import Probe
from energydiag.engine.quantities import by_layer
from energydiag.engine.step import autocast
from energydiag.errors import DiagError, OptionError, first_line
from energydiag.io.layout import MANIFEST, checkpoint_path
from energydiag.io.manifest import LossSpec, ModelSpec
from energydiag.io.rundir import (
    Batch,
    Run,
    is_energy_batch,
    load_batch_file,
    load_checkpoint_file,
)
from energydiag.io.state import restore_rng
from energydiag.reference.losses import energy_matrix
from energydiag.schema import Record, Report, report

NORM_OUTLIER = 100.0
DEFAULT_LOSS = LossSpec(name="inbatch_infonce", kwargs={"tau": 0.5})


# --- the model on a batch ----------------------------------------------------------------------


MATRIX_SHOWN = 64  # the energy matrix kept for reports: its top-left corner beyond this


@dataclass
class BatchReport(Record):
    step: int
    batch_size: int
    candidates: int
    tau: float | None
    tau_source: str
    loss_name: str
    loss: float
    energy: dict[str, float]
    head: dict[str, Any] | None
    bounds: dict[str, dict[str, float]]
    loss_position: float | None
    saturation: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    param_grad_norms: dict[str, float]
    all_masked_samples: list[int]
    energy_matrix: list[list[float]] = field(default_factory=list)  # at most MATRIX_SHOWN rows
    nonfinite_energies: int = 0
    doctor: dict[str, float] = field(default_factory=dict)  # energydiag.contrastive.doctor
    findings: list[rules.Finding] = field(default_factory=list)


class UserCodeRaised(Exception):
    """The user's model or loss raised while a batch was inspected."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def batch_report(
    model: nn.Module,
    loss_fn: LossFn,
    loss_spec: LossSpec,
    batch: Batch,
    device: torch.device,
    tau: Tau,
    autocast_dtype: str | None = None,
) -> BatchReport:
    data = batch.on(device)
    saturation, outputs = SaturationCounter(), ModuleOutputs(model)
    try:  # the user's model and loss: what they raise is a finding; our own bugs are not
        head, loss, matrix, positive_first = _forward(
            model, loss_fn, batch, data, autocast(device, autocast_dtype), [saturation], outputs
        )
    except DiagError:
        raise
    except Exception as err:
        raise UserCodeRaised(err) from err
    energy = {k: float(v) for k, v in energy_stats(matrix, tau.value, positive_first).items()}
    report = BatchReport(
        step=batch.step,
        batch_size=matrix.shape[0],
        candidates=matrix.shape[1],
        tau=tau.value,
        tau_source=tau.said,
        loss_name=loss_spec.label,
        loss=float(loss.detach()),
        energy=energy,
        head=None
        if head is None
        else {"bounds": list(head.bounds), "source": head.source, "module": head.module},
        bounds=_bounds(matrix.shape[1], tau.value, energy, head),
        loss_position=None,
        saturation=[asdict(s) | {"fraction": s.fraction} for s in saturation.rows()],
        layers=[_layer_row(r) for r in outputs.finish()],
        param_grad_norms={
            k: float(v)
            for k, v in by_layer(
                [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
            ).items()
        },
        all_masked_samples=all_masked_samples(data),
        energy_matrix=matrix[:MATRIX_SHOWN, :MATRIX_SHOWN].detach().double().cpu().tolist(),
        nonfinite_energies=int((~torch.isfinite(matrix.detach())).sum()),
        doctor=doctor.measure(data, matrix, tau.value, positive_first, head.span if head else None),
    )
    report.findings = _batch_findings(report, batch, head, loss_spec, autocast_dtype)
    return report


def _forward(model, loss_fn, batch, data, casting, observers, outputs):
    """The run's forward and backward on the batch, with the step's RNG state: (the bounded
    head, the loss, the energy matrix, whether its positives come first)."""
    head = find_head(model, data)
    restore_rng(batch.rng)
    with outputs.attached(), Instrument(observers).attached(model=model), casting:
        loss, diagnostics = loss_fn(model, data)
    if loss.requires_grad:
        loss.backward()
    matrix, positive_first = scored_energies(diagnostics) or (None, False)
    if matrix is None:  # a plug-in loss that reports no energies: score the in-batch matrix
        with torch.no_grad():
            matrix = energy_matrix(model, data["h"], data["a_pos"], data.get("pad_mask"))
    return head, loss, matrix, positive_first


def _bounds(
    candidates: int, tau: float | None, energy: dict[str, float], head: Head | None
) -> dict:
    if tau is None:
        return {}
    bounds = {
        "observed": infonce_bounds(candidates, tau, energy["energy_max"] - energy["energy_min"])
    }
    if head is not None and math.isfinite(head.span):
        bounds["head"] = infonce_bounds(candidates, tau, head.span)
    return bounds


def _batch_findings(
    report: BatchReport, batch: Batch, head: Head | None, loss: LossSpec, autocast_dtype: str | None
) -> list:
    masked = rules.all_masked_rows(report.all_masked_samples, str(batch.path))
    if report.nonfinite_energies or not math.isfinite(report.loss):
        # statistics of NaN energies ("span nan", "at chance") say nothing: name the fault
        total = report.batch_size * report.candidates
        nonfinite = rules.forward_nonfinite(
            report.step, report.loss, report.nonfinite_energies, total
        )
        return rules.ranked([masked, nonfinite])
    reach = report.bounds.get("head") or report.bounds.get("observed")
    infonce = scored_candidates(loss) is not None
    if reach and reach["chance"] > reach["floor"]:
        report.loss_position = (report.loss - reach["floor"]) / (reach["chance"] - reach["floor"])
    offset = rules.input_offset(doctor.input_scales(batch.tensors))
    explained = offset is not None and offset.evidence["input"] == "h"
    return rules.ranked(
        [
            *rules.doctor_findings(
                report.doctor,
                report.loss,
                reach if infonce else None,
                autocast_dtype,
                loss.kwargs.get("margin"),
                report.energy["energy_std"],
                explained,
            ),
            masked,
            rules.saturation(report.saturation),
            *_range_findings(report, head, loss, reach if infonce else None),
            rules.few_negatives(report.candidates, report.loss_position) if infonce else None,
            offset,
            rules.coarse_inputs(_half_inputs(batch.tensors), report.energy),
            rules.gap_below_autocast_resolution(autocast_dtype, report.energy),
            rules.dead_gradients(report.param_grad_norms, report.step),
        ]
    )


def _range_findings(
    report: BatchReport, head: Head | None, loss: LossSpec, reach: dict[str, float] | None
) -> list:
    """Where the loss sits against its bounds, and what the head's range and the margin allow."""
    span = head.span if head else None
    bounds = head.bounds if head else None
    head_reach = (
        infonce_bounds(report.candidates, report.tau, span) if span and report.tau else None
    )
    return [
        rules.loss_position(report.loss, reach, report.candidates) if reach else None,
        rules.narrow_energy_range(report.energy, report.tau, head is not None),
        rules.bounded_head_floor(bounds, report.tau, report.candidates, head_reach),
        rules.unreachable_margin(loss.kwargs.get("margin"), bounds),
        rules.contrastive_health(
            report.energy,
            report.batch_size,
            report.candidates,
            loss.label,
            loss.kwargs.get("margin"),
        ),
        rules.stuck_between_floor_and_chance(
            report.loss_position, report.energy, report.tau, head is not None
        ),
    ]


def _half_inputs(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        k: str(t.dtype).replace("torch.", "")
        for k, t in tensors.items()
        if t.dtype in (torch.bfloat16, torch.float16)
    }


def _layer_row(r) -> dict[str, Any]:
    s = r.output
    return {
        "module": r.path,
        "kind": r.kind,
        "min": s.min,
        "max": s.max,
        "std": s.std,
        "nonfinite": s.nonfinite,
        "output_grad_norm": r.grad_norm,
    }


# --- the whole inspection ----------------------------------------------------------------------


@report("inspect")
@dataclass
class InspectReport(Report):
    checkpoint: CheckpointReport
    batch: BatchReport | None
    findings: list[rules.Finding]
    notes: list[str] = field(default_factory=list)


def inspect(
    ckpt_path: Path,
    run_dir: Path | None = None,
    batch_path: Path | None = None,
    model_spec: ModelSpec | None = None,
    tau: float | None = None,
    device: torch.device | None = None,
    progress: Callable[[str, int], None] | None = None,
    loss_spec: LossSpec | None = None,
) -> InspectReport:
    """Inspect a checkpoint; with a model (from the run or ``model_spec``) and a batch, run it."""
    device = device or torch.device("cpu")
    ckpt_path = Path(ckpt_path)
    run = find_run(ckpt_path, run_dir)
    manifest = run.manifest if run else None
    first = (
        checkpoint_path(run.root, run.checkpoint_steps[0]) if run and run.checkpoint_steps else None
    )
    ckpt = checkpoint_report(
        ckpt_path, manifest.autocast_dtype if manifest else None, first, progress
    )
    spec = model_spec or (manifest.model if manifest else None)
    batch = _find_batch(run, ckpt.step, batch_path)
    if batch_path is not None and spec is None:
        raise OptionError(
            "running the model on a batch needs a model", "model", "run_dir", path=batch_path
        )
    notes, batch_rep, skipped = [], None, []
    if batch is None or spec is None:
        notes.append(
            "no batch run: the energy statistics need a batch (and a model, without a run)"
        )
    elif not is_energy_batch(batch.tensors):
        skipped.append(rules.not_an_energy_batch(batch.step, sorted(batch.tensors)))
    elif ckpt.findings and rules.has_code(ckpt.findings, "checkpoint.nonfinite"):
        notes.append("the model was not run: the checkpoint holds non-finite values")
    else:
        loss = loss_spec or (manifest.loss if manifest else DEFAULT_LOSS)
        chosen = resolve_tau(tau, loss, manifest is not None or loss_spec is not None)
        notes += [chosen.said] if chosen.source == "default" else []
        try:
            batch_rep = _run_batch(spec, ckpt_path, loss, batch, device, chosen, manifest)
        except UserCodeRaised as err:  # the user's model or loss raised: a finding, not a crash
            raised = rules.model_raised(batch.step, first_line(err.original))
            return InspectReport(ckpt, None, rules.ranked([*ckpt.findings, raised]), notes)
    found = ckpt.findings + (batch_rep.findings if batch_rep else []) + skipped
    if run is not None:  # the run's recorded schedule, whatever step this checkpoint is
        found += schedule_causes(schedule_evidence(run))
    if batch_rep is not None:
        found.append(rules.unused_negatives(batch_rep.loss_name, sorted(batch.tensors)))
    return InspectReport(ckpt, batch_rep, rules.ranked(found), notes)


def _run_batch(spec, ckpt_path, loss, batch, device, tau, manifest) -> BatchReport:
    overrides = {"tau": tau.value} if tau.source == "option" else {}
    blamed = "the model and loss options" if manifest is None else ckpt_path
    probe = Probe(spec, device, blamed, loss, **overrides)
    model = probe.load(load_checkpoint_file(ckpt_path))
    dtype = manifest.autocast_dtype if manifest else None
    return batch_report(model, probe.loss_fn, loss, batch, device, tau, dtype)


def find_run(ckpt_path: Path, run_dir: Path | None) -> Run | None:
    """The run a checkpoint belongs to: the one named, else the folder above checkpoints/."""
    if run_dir is not None:
        return Run(run_dir)
    guess = ckpt_path.resolve().parent.parent
    return Run(guess) if (guess / MANIFEST).is_file() else None


def _find_batch(run: Run | None, step: int | None, batch_path: Path | None) -> Batch | None:
    if batch_path is not None:  # its own step, else the checkpoint's
        return load_batch_file(
            batch_path, fallback=step if step is not None and step >= 0 else None
        )
    if run is None or step is None:
        return None
    return run.batch(step) if step in run.batch_steps else None
