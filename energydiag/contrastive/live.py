"""The energy model, watched live: what the bounded head and the InfoNCE loss do step by step.

``EnergyWatch`` hooks the energy model's output (every forward of a watched step: the B² swap
pairs, or positives and negatives) and measures the energies' span, the logit spread at the
loss's temperature, the fraction of energies pinned against the head's bounds, and what the
loss could reach (chance, and the floor the bounds allow). Its rules (``contrastive/alarms.py``)
alarm when the head saturates, or the loss sits at chance or at that floor, step after step.

The head's bounds are found once, on the first watched batch, by the head finder's own forward,
in eval mode with the RNG forked, so the user's training is untouched by it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from energydiag.contrastive.alarms import NEAR
from energydiag.contrastive.bounds import candidate_count, infonce_bounds, scored_candidates
from energydiag.contrastive.head import find_head
from energydiag.io.rundir import Batch
from energydiag.record.accumulation import micro_batches
from energydiag.record.live import LiveQuantity, Values, Watched


class EnergyWatch(LiveQuantity):
    """Every ``every`` steps: ``energy_span``, ``logit_spread``, ``saturation`` (bounded heads),
    ``chance_loss`` and ``loss_floor`` (InfoNCE losses)."""

    name = "energy"
    columns = ("energy_span", "logit_spread", "saturation", "chance_loss", "loss_floor")

    def __init__(self, every: int = 10) -> None:
        self.every, self.on, self.taken, self.count = every, False, [], 0
        self.bounds: tuple[float, float] | None = None
        self.searched, self.hook = False, None
        self.candidates: int | None = None

    def attach(self, watched: Watched) -> bool:
        """The manifest's loss and model, unless the Recorder was told where the energy model
        is (a trainer's step is its own loss)."""
        super().attach(watched)
        target = watched.energy
        loss = target.loss if target else watched.manifest.loss
        self.model = target.module if target else watched.model
        self.kind = scored_candidates(loss)
        self.tau = loss.kwargs.get("tau")
        if self.kind is None and loss.name != "margin":
            return False  # not an energy loss: the model's output is something else
        self.hook = self.model.register_forward_hook(self._take)
        return True

    def start(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        self.on, self.taken, self.count = step % self.every == 0, [], 0
        if not self.on:
            return
        batch = (micro_batches(batch) or [batch])[0]  # accumulated: the first micro-batch's
        if not self.searched:  # an FSDP model's forward is collective: no search on one rank
            sharded = (self.watched.manifest.distributed or {}).get("parallelism") == "fsdp"
            self.bounds = None if sharded else self._find_bounds(batch)
            self.searched = True
        if self.kind is not None and "h" in batch:
            found = Batch(step, Path(), dict(batch), {})
            self.candidates = candidate_count(self.kind, found, self.watched.manifest)

    def _find_bounds(self, batch: dict[str, torch.Tensor]) -> tuple[float, float] | None:
        model, self.on = self.model, False  # the search's forward is not the step's
        training = model.training
        devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
        try:
            with torch.random.fork_rng(devices=devices):
                model.eval()
                head = find_head(model, batch)
        except Exception:  # a model that is not E(h, a, pad_mask): saturation goes unwatched
            head = None
        finally:
            model.train(training)
            self.on = True
        return head.bounds if head and math.isfinite(head.span) and head.span > 0 else None

    def _take(self, module: nn.Module, args: tuple, output: object) -> None:
        out = output[0] if isinstance(output, tuple | list) else output
        if not self.on or not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return
        e = out.detach()
        low, high = torch.aminmax(e)
        pinned = e.new_zeros(())
        if self.bounds is not None:
            lo, hi = self.bounds
            margin = NEAR * (hi - lo)
            pinned = ((e < lo + margin) | (e > hi - margin)).sum()
        self.taken.append(torch.stack([low.float(), high.float(), pinned.float()]))
        self.count += e.numel()

    def measure(self, step: int) -> Values:
        if not self.on or not self.taken:
            return {}
        low, high, pinned = torch.stack(self.taken).T
        span = high.max() - low.min()
        values: Values = {"energy_span": span}
        if self.tau:
            values["logit_spread"] = span / self.tau
        if self.bounds is not None:
            values["saturation"] = pinned.sum() / self.count
        if self.candidates:
            values["chance_loss"] = math.log(self.candidates)
            if self.bounds is not None and self.tau:
                width = self.bounds[1] - self.bounds[0]
                values["loss_floor"] = infonce_bounds(self.candidates, self.tau, width)["floor"]
        return values

    def close(self) -> None:
        if self.hook is not None:
            self.hook.remove()


def energy_quantities() -> list[LiveQuantity]:
    return [EnergyWatch()]
