"""`energydiag landscape`: what the policy's action refinement does under the energy, per context.

The model is rebuilt from the checkpoint and handed to the refiner in training mode, the state a
module is in after training unless someone calls eval() — which is the point of the train-mode
check. The starting actions are the batch's first explicit negatives when it has them (proposals
other than the demonstration), else the demonstrations perturbed by 10% of their RMS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from energydiag import findings as rules
from energydiag.analyses.inspection import find_run
from energydiag.contrastive import landscape as land
from energydiag.engine.probe import Probe
from energydiag.engine.registry import resolve
from energydiag.errors import DiagError, OptionError, first_line
from energydiag.findings.landscape import RISING
from energydiag.io.manifest import ModelSpec
from energydiag.io.rundir import Batch, Checkpoint, Run, load_batch_file, load_checkpoint_file
from energydiag.schema import Report, report

INIT_NOISE = 0.1  # perturbed demonstrations: noise of this fraction of the actions' RMS
STABLE_RISING = 0.1
HALVINGS = 10


@report("landscape")
@dataclass
class LandscapeReport(Report):
    checkpoint: str
    step: int
    refiner: str
    start: str
    steps: int
    alpha: float | None
    train_mode_modules: list[str]
    mode_gap: dict[str, float]
    rising_fraction: float
    stable_alpha: float | None
    rows: list[dict[str, Any]]
    findings: list[rules.Finding] = field(default_factory=list)


def landscape(
    ckpt: Path,
    run_dir: Path | None = None,
    batch_path: Path | None = None,
    model_spec: ModelSpec | None = None,
    refine: str | None = None,
    steps: int = 10,
    alpha: float = 0.2,
    device: torch.device | None = None,
    eval_mode: bool = False,
) -> LandscapeReport:
    """``eval_mode``: hand the model over in eval mode (as inference code that calls eval()
    does); by default in training mode, the state a module is left in after training."""
    if steps < 1:
        raise OptionError("must be positive", "steps", value=steps)
    if alpha <= 0:
        raise OptionError("must be positive", "alpha", value=f"{alpha:g}")
    run = find_run(Path(ckpt), run_dir)
    checkpoint = load_checkpoint_file(Path(ckpt))  # read once: the weights and the step
    model = _model(checkpoint, run, model_spec, device or torch.device("cpu"), not eval_mode)
    batch = _batch(checkpoint, run, batch_path)
    data = batch.on(device or torch.device("cpu"))
    h, demo, mask = data["h"], data["a_pos"], data.get("pad_mask")
    a0, start = _start(data)
    refiner = resolve(refine, "refiner") if refine else land.gradient_refiner(steps, alpha)
    with land.training_modules_seen(model) as seen:
        try:
            chain = list(refiner(model, h, a0, mask))
        except Exception as err:  # the user's refiner: its failure is bad input, said once
            raise DiagError(
                None, f"refiner {refine or 'gradient'} raised {first_line(err)}"
            ) from None
    gap = land.mode_gap(model, h, a0, mask)
    e = land.chain_energies(model, h, chain, mask)
    rising = float(land.rising_fraction(e).mean())
    stable = _stable_alpha(model, h, a0, mask, steps, alpha, rising) if not refine else None
    report = LandscapeReport(
        str(ckpt), batch.step, (refine or f"gradient: {steps} steps of {alpha:g}")
        + (" (model in eval mode)" if eval_mode else " (model in training mode)"), start,
        len(chain) - 1, None if refine else alpha, sorted(seen),
        {"mean": float(gap.mean()), "max": float(gap.max())}, rising, stable,
        _rows(model, h, demo, chain, e, mask),
    )  # fmt: skip
    report.findings = rules.ranked(
        [
            rules.train_mode_refinement(report.train_mode_modules, report.mode_gap),
            rules.energy_rises(rising, report.alpha, stable),
            rules.spurious_basin(report.rows),
        ]
    )
    return report


def _model(
    ckpt: Checkpoint, run: Run | None, spec: ModelSpec | None, device: torch.device, training: bool
):
    spec = spec or (run.manifest.model if run else None)
    if spec is None:
        raise OptionError("needs a model to refine under", "run_dir", "model", path=ckpt.path)
    blamed = run.manifest_path if run and spec is run.manifest.model else ckpt.path
    return Probe(spec, device, blamed).load(ckpt).train(training)


def _batch(ckpt: Checkpoint, run: Run | None, path: Path | None) -> Batch:
    if path is not None:
        batch = load_batch_file(path)
    else:
        if run is None or ckpt.step not in set(run.batch_steps):
            raise OptionError("no batch logged at its step", "batch", path=ckpt.path)
        batch = run.batch(ckpt.step)
    if "h" not in batch.tensors or "a_pos" not in batch.tensors:
        raise DiagError(batch.path, "needs contexts 'h' and demonstrations 'a_pos'")
    return batch


def _start(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    if "a_neg" in data:
        return data["a_neg"][:, 0].float(), "the batch's first negatives (a_neg[:, 0])"
    demo = data["a_pos"].float()
    gen = torch.Generator(device=demo.device).manual_seed(0)
    noise = torch.randn(demo.shape, generator=gen, device=demo.device)
    scale = INIT_NOISE * float(demo.square().mean().sqrt())
    return demo + scale * noise, f"demonstrations + noise of {INIT_NOISE:.0%} of their RMS"


def _stable_alpha(model, h, a0, mask, steps, alpha, rising) -> float | None:
    """Halve α until the energy rises on fewer than 10% of steps (eval mode, no dropout)."""
    if rising < RISING:
        return None
    was = model.training
    model.eval()
    try:
        for _ in range(HALVINGS):
            alpha /= 2
            chain = land.gradient_refiner(steps, alpha)(model, h, a0, mask)
            e = land.chain_energies(model, h, chain, mask)
            if float(land.rising_fraction(e).mean()) < STABLE_RISING:
                return alpha
    finally:
        model.train(was)
    return None


def _rows(model, h, demo, chain, e, mask) -> list[dict[str, Any]]:
    line = land.straight_line(model, h, chain[0], chain[-1], mask)
    grads = land.action_gradient_norm(model, h, chain, mask)
    demo_e = land.eval_energy(model, h, demo, mask)
    flat = lambda a: a.reshape(a.shape[0], -1).double()  # noqa: E731
    scale = float(flat(demo).norm(dim=1).mean()) or 1.0
    moved = (flat(chain[-1]) - flat(chain[0])).norm(dim=1)
    from_demo = (flat(chain[-1]) - flat(demo)).norm(dim=1)
    rising = land.rising_fraction(e)
    return [
        {
            "row": i,
            "energy_start": float(e[0, i]),
            "energy_end": float(e[-1, i]),
            "rising_fraction": float(rising[i]),
            "moved": float(moved[i]),
            "moved_over_action_norm": float(moved[i]) / scale,
            "demo_energy": float(demo_e[i]),
            "chosen_energy": float(e[-1, i]),
            "distance_to_demo": float(from_demo[i]),
            "far_from_demo": bool(from_demo[i] > 0.5 * scale),
            "line_local_minima": int(line["local_minima"][i]),
            "line_steepest": float(line["steepest"][i]),
            "grad_norm_max": float(grads[:, i].max()),
            "energy_chain": [float(v) for v in e[:, i]],
            "energy_line": [float(v) for v in line["energy"][:, i]],
        }
        for i in range(e.shape[1])
    ]
