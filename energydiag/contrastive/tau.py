"""The temperature a batch is judged at, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from energydiag.io.manifest import LossSpec


@dataclass(frozen=True)
class Tau:
    """The temperature a batch is judged at, and where it came from (a value, not a sentence)."""

    value: float | None
    source: str  # "option" (given), "run" (the run's loss), "default" (assumed), "none"

    @property
    def said(self) -> str:
        if self.source == "default":
            return f"defaulted: no run and no tau given, so tau {self.value:g} is assumed"
        words = {"option": "given", "run": "the run's loss", "none": "the loss has no tau"}
        return words[self.source]


def resolve_tau(given: float | None, loss: LossSpec, configured: bool = True) -> Tau:
    """The one place a temperature is chosen: the value given, else the loss's own (``configured``
    says whether that loss came from a run or the caller, or is the assumed default)."""
    if given is not None:
        return Tau(given, "option")
    if "tau" in loss.kwargs:
        return Tau(float(loss.kwargs["tau"]), "run" if configured else "default")
    return Tau(None, "none")
