"""What is in a checkpoint, and what the energy model does on a batch.

Two parts. ``checkpoint_report`` streams a safetensors file one tensor at a time (peak memory near
the largest tensor) and computes per-tensor statistics. ``batch_report`` runs the run's real
forward and backward on one batch under the probe and measures the quantities that explain a
stalled InfoNCE loss: energy range, logit spread, the loss bounds, saturation, per-layer norms.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from energydiag import findings as rules
from energydiag.foreign import open_reader
from energydiag.layout import MANIFEST
from energydiag.localise import all_masked_samples
from energydiag.losses import energy_matrix, infonce_bounds
from energydiag.manifest import LossSpec, ModelSpec
from energydiag.models import energy_head_bounds
from energydiag.plugins import LossFn, build_loss, build_model
from energydiag.probe import Probe, as_float, summarize
from energydiag.quantities import energy_stats, layer_grad_norms, layer_of, scored_energies
from energydiag.run import Batch, Run, load_batch_file, load_checkpoint_file, load_checkpoint_step
from energydiag.session import load_checkpoint
from energydiag.state import MODEL_PREFIX, OPTIM_PREFIX, RNG_PREFIX, restore_rng
from energydiag.step import forward
from energydiag.tensorfile import TensorReader

ADAM_RATIO_LIMIT = 100.0
NORM_OUTLIER = 100.0
_HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TensorStats:
    name: str
    group: str
    layer: str
    shape: list[int]
    dtype: str
    numel: int
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    first_nonfinite: list[int] | None = None
    min: float = math.nan
    max: float = math.nan
    mean: float = math.nan
    std: float = math.nan
    l2: float = math.nan
    zero_fraction: float = math.nan
    beyond_autocast_range: int = 0

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    @property
    def rms(self) -> float:
        return self.l2 / math.sqrt(self.numel) if self.numel else 0.0


@dataclass
class CheckpointReport:
    path: str
    metadata: dict[str, str]
    tensors: list[TensorStats]
    layers: list[dict[str, Any]]
    adam: list[dict[str, Any]]
    findings: list[rules.Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def findings_of(self, code: str) -> list[rules.Finding]:
        return [f for f in self.findings if f.code == code]


def tensor_stats(name: str, t: torch.Tensor, autocast_dtype: str | None = None) -> TensorStats:
    group, layer = _role(name)
    dtype = str(t.dtype).replace("torch.", "")
    stats = TensorStats(name, group, layer, list(t.shape), dtype, t.numel())
    if not (t.is_floating_point() and t.numel()):
        return stats
    s = summarize(t)
    stats.nan, stats.posinf, stats.neginf = s.nan, s.posinf, s.neginf
    x = as_float(t)
    if not s.finite:
        flat = int(torch.nonzero(~torch.isfinite(x.reshape(-1)))[0])
        stats.first_nonfinite = [int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape)]
        x = x[torch.isfinite(x)]
    if x.numel():
        stats.min, stats.max, stats.mean, stats.std = s.min, s.max, s.mean, s.std
        stats.l2, stats.zero_fraction = torch.stack(
            [torch.linalg.vector_norm(x), (x == 0).sum() / x.numel()]
        ).tolist()
    if autocast_dtype in _HALF and group == "model":
        stats.beyond_autocast_range = int((x.abs() > torch.finfo(_HALF[autocast_dtype]).max).sum())
    return stats


def _role(name: str) -> tuple[str, str]:
    if name.startswith(OPTIM_PREFIX):
        param, state_field = name[len(OPTIM_PREFIX) :].rsplit(".", 1)
        return "optimizer", f"{layer_of(param)} {state_field}"
    return "model", layer_of(name.removeprefix(MODEL_PREFIX))


def checkpoint_report(
    reader: TensorReader,
    autocast_dtype: str | None = None,
    eps: float = 1e-8,
    progress: Callable[[str, int], None] | None = None,
) -> CheckpointReport:
    """One pass over the file in name order, so a parameter's two Adam moments arrive together."""
    tensors, adam, moments = [], [], {}
    names = sorted(n for n in reader.names if not n.startswith(RNG_PREFIX))
    for name in names:
        t = reader.get(name)
        if progress:
            progress(name, len(names))
        tensors.append(tensor_stats(name, t, autocast_dtype))
        param, _, state_field = name.removeprefix(OPTIM_PREFIX).rpartition(".")
        if name.startswith(OPTIM_PREFIX) and state_field in ("exp_avg", "exp_avg_sq"):
            moments.setdefault(param, {})[state_field] = t
            if len(moments[param]) == 2:
                adam.append(_adam_row(param, moments.pop(param), eps))
    report = CheckpointReport(str(reader.path), reader.metadata, tensors, _layers(tensors), adam)
    report.findings = rules.ranked(
        [
            rules.nonfinite_tensors([asdict(t) for t in tensors if t.nonfinite]),
            rules.norm_outliers(_norm_outliers(tensors)),
            rules.adam_blowup_risk(report.adam, ADAM_RATIO_LIMIT),
            rules.beyond_autocast_range(
                [asdict(t) for t in tensors if t.beyond_autocast_range], autocast_dtype
            ),
        ]
    )
    return report


def _layers(tensors: list[TensorStats]) -> list[dict[str, Any]]:
    by_layer: dict[tuple[str, str], list[TensorStats]] = defaultdict(list)
    for t in tensors:
        by_layer[(t.group, t.layer)].append(t)
    rows = []
    for (group, layer), items in by_layer.items():
        finite = [t for t in items if not math.isnan(t.l2)]
        rows.append(
            {
                "group": group,
                "layer": layer,
                "tensors": len(items),
                "numel": sum(t.numel for t in items),
                "nonfinite": sum(t.nonfinite for t in items),
                "l2": math.sqrt(sum(t.l2**2 for t in finite)) if finite else math.nan,
                "min": min((t.min for t in finite), default=math.nan),
                "max": max((t.max for t in finite), default=math.nan),
            }
        )
    return rows


def _norm_outliers(tensors: list[TensorStats]) -> list[dict[str, Any]]:
    """Parameters whose RMS is ≥100× (or ≤1/100 of) the median of same-role parameters."""
    peers: dict[str, list[TensorStats]] = defaultdict(list)
    for t in tensors:
        if t.group == "model" and t.numel > 1 and not math.isnan(t.l2):
            peers[t.name.rsplit(".", 1)[-1]].append(t)
    outliers = []
    for role, items in peers.items():
        if len(items) < 3:
            continue
        median = statistics.median(t.rms for t in items)
        for t in items:
            ratio = t.rms / median if median else math.inf
            if ratio >= NORM_OUTLIER or 0 < ratio <= 1 / NORM_OUTLIER:
                outliers.append(
                    {
                        "tensor": t.name,
                        "rms": t.rms,
                        "peer_median_rms": median,
                        "ratio": ratio,
                        "role": role,
                    }
                )
    return outliers


def _adam_row(param: str, moments: dict[str, torch.Tensor], eps: float) -> dict[str, Any]:
    """The largest |exp_avg| / (sqrt(exp_avg_sq) + eps): the scale of Adam's next update."""
    m, v = moments["exp_avg"].float(), moments["exp_avg_sq"].float()
    ratio = m.abs() / (v.clamp_min(0).sqrt() + eps)
    # Non-finite moments are reported by the non-finite rule; a finite m over a zero
    # denominator (eps = 0) stays inf here, which is the blow-up this rule is for.
    ratio = torch.where(torch.isfinite(m) & torch.isfinite(v), ratio, 0.0)
    return {
        "parameter": param,
        "max_ratio": float(ratio.max()),
        "elements_over_limit": int((ratio > ADAM_RATIO_LIMIT).sum()),
        "exp_avg_sq_min": float(v.min()),
        "exp_avg_abs_max": float(m.abs().max()),
    }


# --- the model on a batch ----------------------------------------------------------------------


@dataclass
class BatchReport:
    step: int
    batch_size: int
    candidates: int
    tau: float | None
    loss: float
    energy: dict[str, float]
    head_bounds: list[float] | None
    bounds: dict[str, dict[str, float]]
    loss_position: float | None
    saturation: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    param_grad_norms: dict[str, float]
    all_masked_samples: list[int]
    findings: list[rules.Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_report(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    tau: float | None,
    device: torch.device,
    autocast_dtype: str | None = None,
    margin: float | None = None,
) -> BatchReport:
    data = {k: v.to(device) for k, v in batch.tensors.items()}
    restore_rng(batch.rng)
    probe = Probe(model, grad_outputs=True)
    with probe.attached():
        loss, diagnostics = forward(model, loss_fn, data, device, autocast_dtype)
    if loss.requires_grad:
        loss.backward()
    matrix, positive_first = scored_energies(diagnostics) or (None, False)
    if matrix is None:  # a plug-in loss that reports no energies: score the in-batch matrix
        with torch.no_grad():
            matrix = energy_matrix(model, data["h"], data["a_pos"], data.get("pad_mask"))
    energy = {k: float(v) for k, v in energy_stats(matrix, tau, positive_first).items()}
    b = matrix.shape[1]  # candidates per row: B for swap InfoNCE, 1 + M with explicit negatives
    head = energy_head_bounds(model)
    bounds = {}
    if tau is not None:
        bounds["observed"] = infonce_bounds(b, tau, energy["energy_max"] - energy["energy_min"])
        if head is not None and math.isfinite(head[1] - head[0]):
            bounds["head"] = infonce_bounds(b, tau, head[1] - head[0])
    reach = bounds.get("head") or bounds.get("observed")
    position = None
    if reach and reach["chance"] > reach["floor"]:
        position = (float(loss.detach()) - reach["floor"]) / (reach["chance"] - reach["floor"])
    masked = all_masked_samples(data)
    report = BatchReport(
        step=batch.step,
        batch_size=matrix.shape[0],
        candidates=b,
        tau=tau,
        loss=float(loss.detach()),
        energy=energy,
        head_bounds=list(head) if head else None,
        bounds=bounds,
        loss_position=position,
        saturation=[
            {
                "module": s.module,
                "op": s.op,
                "total": s.total,
                "saturated": s.saturated,
                "fraction": s.fraction,
            }
            for s in probe.saturation()
        ],
        layers=_layer_rows(probe),
        param_grad_norms={k: float(v) for k, v in layer_grad_norms(model).items()},
        all_masked_samples=masked,
    )
    report.findings = rules.ranked(
        [
            rules.all_masked_rows(masked, str(batch.path)),
            rules.saturation(report.saturation),
            rules.loss_position(report.loss, reach, b) if reach else None,
            rules.narrow_energy_range(energy, tau),
            rules.bounded_head_floor(head, tau, b),
            rules.unreachable_margin(margin, head),
            rules.coarse_inputs(_half_inputs(batch.tensors), energy),
        ]
    )
    return report


def _half_inputs(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        k: str(t.dtype).replace("torch.", "")
        for k, t in tensors.items()
        if t.dtype in (torch.bfloat16, torch.float16)
    }


def _layer_rows(probe: Probe) -> list[dict[str, Any]]:
    grads = {k: math.sqrt(float(v)) for k, v in probe.modules.output_grad_sq.items()}
    rows = []
    for e in probe.modules.events:
        if e.output is None:  # a module that returned no float tensor
            continue
        nonfinite = e.output.nan + e.output.posinf + e.output.neginf
        rows.append(
            {
                "module": e.path,
                "kind": e.kind,
                "min": e.output.min,
                "max": e.output.max,
                "std": e.output.std,
                "nonfinite": nonfinite,
                "output_grad_norm": grads.get(e.path),
            }
        )
    return rows


# --- the whole inspection ----------------------------------------------------------------------


@dataclass
class InspectReport:
    checkpoint: CheckpointReport
    batch: BatchReport | None
    findings: list[rules.Finding]

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint.to_dict(),
            "batch": self.batch.to_dict() if self.batch else None,
            "findings": [f.to_dict() for f in self.findings],
        }


def inspect(
    ckpt_path: Path,
    run_dir: Path | None = None,
    batch_path: Path | None = None,
    model_spec: ModelSpec | None = None,
    tau: float | None = None,
    device: torch.device | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> InspectReport:
    """Inspect a checkpoint; with a model (from the run or ``model_spec``) and a batch, run it."""
    device = device or torch.device("cpu")
    run = _find_run(ckpt_path, run_dir)
    manifest = run.manifest if run else None
    with open_reader(ckpt_path) as r:
        eps = _adam_eps(r.metadata)
        ckpt_report = checkpoint_report(
            r, manifest.autocast_dtype if manifest else None, eps, progress
        )
    batch = _find_batch(run, ckpt_path, batch_path)
    spec = model_spec or (manifest.model if manifest else None)
    batch_rep = None
    if (
        batch is not None
        and spec is not None
        and not ckpt_report.findings_of("checkpoint.nonfinite")
    ):
        model = build_model(spec).to(device)
        load_checkpoint(load_checkpoint_file(ckpt_path), model, None)
        loss_spec = (
            manifest.loss if manifest else LossSpec(name="inbatch_infonce", kwargs={"tau": 0.5})
        )
        loss_fn = build_loss(loss_spec, **({} if tau is None else {"tau": tau}))
        tau = tau if tau is not None else loss_spec.kwargs.get("tau")
        margin = loss_spec.kwargs.get("margin")
        try:
            batch_rep = batch_report(
                model,
                loss_fn,
                batch,
                tau,
                device,
                manifest.autocast_dtype if manifest else None,
                margin,
            )
        except Exception as err:  # the user's model or loss raised: a finding, not a crash
            raised = rules.model_raised(batch.step, f"{type(err).__name__}: {err}")
            return InspectReport(ckpt_report, None, rules.ranked([*ckpt_report.findings, raised]))
    found = ckpt_report.findings + (batch_rep.findings if batch_rep else [])
    return InspectReport(ckpt_report, batch_rep, rules.ranked(found))


def _find_run(ckpt_path: Path, run_dir: Path | None) -> Run | None:
    if run_dir is not None:
        return Run(run_dir)
    guess = ckpt_path.resolve().parent.parent
    return Run(guess) if (guess / MANIFEST).is_file() else None


def _find_batch(run: Run | None, ckpt_path: Path, batch_path: Path | None) -> Batch | None:
    if batch_path is not None:
        return load_batch_file(batch_path)
    if run is None:
        return None
    step = load_checkpoint_step(ckpt_path)
    return run.batch(step) if step in run.batch_steps else None


def _adam_eps(meta: dict[str, str]) -> float:
    groups = json.loads(meta.get("param_groups", "[]"))
    return float(groups[0].get("eps", 1e-8)) if groups else 1e-8
