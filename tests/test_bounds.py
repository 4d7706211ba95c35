"""One answer to "is this InfoNCE, over how many candidates, at which temperature", shared by
inspect, curves and every command that reads a run's curve."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from energydiag.contrastive.bounds import Candidates, candidate_count, scored_candidates
from energydiag.contrastive.tau import resolve_tau
from energydiag.io.manifest import LossSpec
from energydiag.io.rundir import Batch


class _Manifest:
    world_size = 4


BATCH = Batch(0, Path("b"), {"h": torch.zeros(3, 5, 2), "a_neg": torch.zeros(3, 7, 4, 2)}, {})


@pytest.mark.parametrize(
    ("loss", "kind", "count"),
    [
        (LossSpec(name="inbatch_infonce", kwargs={"tau": 0.5}), Candidates.IN_BATCH, 3),
        (LossSpec(name="gathered_infonce", kwargs={"tau": 0.5}), Candidates.GATHERED, 12),
        (LossSpec(name="infonce_negatives", kwargs={"tau": 0.5}), Candidates.NEGATIVES, 8),
        (LossSpec(target="team.losses:energy_loss", kwargs={"tau": 0.5}), Candidates.IN_BATCH, 3),
        (LossSpec(name="margin", kwargs={"margin": 1.0}), None, None),
        (LossSpec(target="team.losses:mse"), None, None),
    ],
)
def test_which_candidates_a_loss_scores(loss, kind, count):
    assert scored_candidates(loss) is kind
    if kind is not None:
        assert candidate_count(kind, BATCH, _Manifest()) == count


def test_the_temperature_says_where_it_came_from():
    run_loss = LossSpec(name="inbatch_infonce", kwargs={"tau": 0.2})
    assert resolve_tau(2.0, run_loss).value == 2.0 and resolve_tau(2.0, run_loss).source == "option"
    assert (resolve_tau(None, run_loss).value, resolve_tau(None, run_loss).source) == (0.2, "run")
    assumed = resolve_tau(None, run_loss, configured=False)
    assert assumed.source == "default" and "assumed" in assumed.said
    assert resolve_tau(None, LossSpec(name="margin")).value is None
    assert math.isclose(resolve_tau(None, LossSpec(kwargs={"tau": 1})).value, 1.0)
