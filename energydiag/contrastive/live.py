"""The energy model, watched live: what the bounded head and the InfoNCE loss do step by step.

``EnergyWatch`` hooks the energy model's output (every forward of a watched step: the B² swap
pairs, or positives and negatives) and measures the energies' span, the logit spread at the
loss's temperature, the fraction of energies pinned against the head's bounds, and what the
loss could reach (chance, and the floor the bounds allow). Its rules alarm when the head
saturates, or the loss sits at chance or at that floor, step after step.

The head's bounds are found once, on the first watched batch, by the head finder's own forward,
in eval mode with the RNG forked, so the user's training is untouched by it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from energydiag.contrastive.bounds import candidate_count, infonce_bounds, scored_candidates
from energydiag.contrastive.head import find_head
from energydiag.io.rundir import Batch
from energydiag.record.live import LiveQuantity, Values, Watched
from energydiag.record.monitors import Alarm, Monitor, Sustained

NEAR = 0.01  # within 1% of the span from a bound: a sigmoid's slope there is < 4% of its peak


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
        super().attach(watched)
        loss = watched.manifest.loss
        self.kind = scored_candidates(loss)
        self.tau = loss.kwargs.get("tau")
        if self.kind is None and loss.name != "margin":
            return False  # not an energy loss: the model's output is something else
        self.hook = watched.model.register_forward_hook(self._take)
        return True

    def start(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        self.on, self.taken, self.count = step % self.every == 0, [], 0
        if not self.on:
            return
        if not self.searched:  # an FSDP model's forward is collective: no search on one rank
            sharded = (self.watched.manifest.distributed or {}).get("parallelism") == "fsdp"
            self.bounds = None if sharded else self._find_bounds(batch)
            self.searched = True
        if self.kind is not None and "h" in batch:
            found = Batch(step, Path(), dict(batch), {})
            self.candidates = candidate_count(self.kind, found, self.watched.manifest)

    def _find_bounds(self, batch: dict[str, torch.Tensor]) -> tuple[float, float] | None:
        model, self.on = self.watched.model, False  # the search's forward is not the step's
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


class Saturation(Sustained):
    """Most energies pinned against the bounded head's bounds, check after check: the head's
    slope is near zero there, so the loss's gradient no longer reaches the network."""

    name = "saturation"
    columns = ("saturation",)

    def __init__(self, level: float = 0.9, steps: int = 3) -> None:
        super().__init__()
        self.level, self.steps = level, steps

    def held(self, saturation: np.ndarray) -> np.ndarray:
        return saturation >= self.level

    def message(self, step: int, row: dict[str, float]) -> Alarm:
        share = row["saturation"]
        return Alarm(
            step,
            self.name,
            f"{share:.0%} of the energies sit within {NEAR:.0%} of the bounded head's limits, "
            f"{self.steps} checks in a row since step {self.since}: the head's slope there is "
            "below 4% of its peak, and the gradient through it vanishes",
            {"saturation": share, "since": self.since, "level": self.level},
        )


class LossPinned(Sustained):
    """The loss within ``tolerance`` of a level it should leave (or cannot pass), check after
    check, once ``after`` steps of warm-up are over."""

    level = "chance_loss"

    def __init__(self, tolerance: float = 0.01, steps: int = 5, after: int = 100) -> None:
        super().__init__()
        self.tolerance, self.steps, self.after = tolerance, steps, after
        self.columns = ("loss", self.level)

    def held(self, loss: np.ndarray, level: np.ndarray) -> np.ndarray:
        return np.abs(loss - level) <= self.tolerance * np.maximum(np.abs(level), 1e-3)


class LossAtChance(LossPinned):
    """The InfoNCE loss at log(candidates): the energies do not tell positives from negatives."""

    name = "loss_at_chance"
    optional = ("loss_floor",)

    def held(self, loss: np.ndarray, level: np.ndarray, floor: np.ndarray) -> np.ndarray:
        """Not when the head's floor is itself at chance (NaN: no floor logged):
        ``loss_at_floor`` says why, then."""
        unreachable = floor >= level * (1 - self.tolerance)
        return super().held(loss, level) & ~unreachable

    def message(self, step: int, row: dict[str, float]) -> Alarm:
        spread = row.get("logit_spread")
        said = "" if spread is None else f" (logit spread {spread:.3g})"
        return Alarm(
            step,
            self.name,
            f"the loss {row['loss']:.4g} has stayed within {self.tolerance:.0%} of chance "
            f"({row['chance_loss']:.4g}) for {self.steps} checks since step {self.since}: the "
            f"energies do not tell the positive from its negatives{said}",
            {"loss": row["loss"], "chance_loss": row["chance_loss"], "since": self.since},
        )


class LossAtFloor(LossPinned):
    """The InfoNCE loss at the lowest value the bounded head's span allows at this temperature:
    it cannot go lower whatever the model learns."""

    name = "loss_at_floor"
    level = "loss_floor"

    def message(self, step: int, row: dict[str, float]) -> Alarm:
        floor, chance = row["loss_floor"], row.get("chance_loss", math.nan)
        room = (
            f" (chance is {chance:.4g}: the span leaves almost no room)"
            if (floor >= chance * (1 - self.tolerance))
            else ""
        )
        return Alarm(
            step,
            self.name,
            f"the loss {row['loss']:.4g} has sat at the floor {floor:.4g} that the bounded "
            f"head's span allows at this temperature for {self.steps} checks since step "
            f"{self.since}{room}: it cannot go lower whatever the model learns",
            {"loss": row["loss"], "loss_floor": floor, "chance_loss": chance, "since": self.since},
        )


def energy_quantities() -> list[LiveQuantity]:
    return [EnergyWatch()]


def energy_monitors() -> list[Monitor]:
    return [Saturation(), LossAtChance(), LossAtFloor()]
