"""The energies' common offset over checkpoints: what swap InfoNCE cannot see.

The in-batch loss is invariant to E_ij + c(h_i): a row offset that drifts costs nothing until it
pushes a bounded head into saturation, where the gradient vanishes — a slow road to a flat loss.
Measured on each checkpoint's own logged batch (at most MAX_POINTS, evenly spread), in eval mode.
"""

from __future__ import annotations

import torch

from energydiag.contrastive.head import find_head
from energydiag.engine.probe import Probe
from energydiag.errors import DiagError, first_line
from energydiag.io.rundir import Run
from energydiag.reference.losses import energy_matrix

MAX_POINTS = 8


def offset_trend(run: Run, device: torch.device | None = None) -> dict:
    """{"points": [{step, energy_mean, within_row_std}], "bounds": the head's (lo, hi) or None}.
    Nothing (and why, under "skipped") when the run's batches or model are not an energy
    model's: a trainer run's classifier is no failure of this check."""
    steps = run.checkpoints_with_batches
    if len(steps) < 3:
        return {"points": [], "bounds": None, "skipped": "fewer than 3 checkpoints with a batch"}
    picked = sorted(
        {steps[round(i * (len(steps) - 1) / (MAX_POINTS - 1))] for i in range(MAX_POINTS)}
    )
    if not all(k in run.batch(picked[0]).tensors for k in ("h", "a_pos")):
        return {"points": [], "bounds": None, "skipped": "not an energy-model batch"}
    device = device or torch.device("cpu")
    probe = Probe(run.manifest.model, device, run.manifest_path)
    try:
        return _trend(run, probe, picked, device)
    except DiagError:
        raise
    except Exception as err:  # the model does not take (h, a, pad_mask): the check does not apply
        return {"points": [], "bounds": None, "skipped": f"the model raised {first_line(err)}"}


def _trend(run: Run, probe: Probe, picked: list[int], device: torch.device) -> dict:
    points, bounds = [], None
    for step in picked:
        model = probe.load(run.checkpoint(step)).eval()
        data = run.batch(step).on(device)
        with torch.no_grad():
            e = energy_matrix(model, data["h"], data["a_pos"], data.get("pad_mask")).double()
            head = find_head(model, data) if not points else None
        bounds = list(head.bounds) if head else bounds
        points.append(
            {
                "step": step,
                "energy_mean": float(e.mean()),
                "within_row_std": float(e.std(dim=1).mean()),
            }
        )
    return {"points": points, "bounds": bounds}
