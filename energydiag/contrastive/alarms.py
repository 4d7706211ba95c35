"""The energy model's live rules: the bounded head saturating, the InfoNCE loss pinned at chance
or at the floor the head allows. Over the columns ``contrastive/live.py`` measures, with numpy
alone, so the same rules judge a log offline without torch."""

from __future__ import annotations

import math

import numpy as np

from energydiag.record.monitors import Alarm, Monitor, Sustained

NEAR = 0.01  # within 1% of the span from a bound: a sigmoid's slope there is < 4% of its peak


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


def energy_monitors() -> list[Monitor]:
    return [Saturation(), LossAtChance(), LossAtFloor()]
