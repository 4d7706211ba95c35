import math

import pytest
import torch
from torch import nn

from energydiag.contrastive.bounds import infonce_bounds
from energydiag.reference.losses import (
    energy_matrix,
    inbatch_infonce,
    infonce_negatives,
    margin,
)


class TableEnergy(nn.Module):
    """E(h_i, a_j) read from a fixed table, via ids carried in h and a."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, h, a, pad_mask=None):
        return self.table[h[:, 0, 0].long(), a[:, 0, 0].long()].unsqueeze(-1)


def ids_batch(b: int, extra: dict | None = None) -> dict:
    ids = torch.arange(b, dtype=torch.float32)
    return {"h": ids.view(b, 1, 1), "a_pos": ids.view(b, 1, 1), **(extra or {})}


def test_uniform_energies_give_exactly_log_b():
    for b in (2, 8, 24):
        loss, _ = inbatch_infonce(TableEnergy(torch.full((b, b), 0.5)), ids_batch(b), tau=0.5)
        assert loss.item() == pytest.approx(math.log(b), abs=1e-6)


def test_sigmoid_floor_attained_at_maximal_gap():
    b, tau = 8, 0.5
    table = torch.ones(b, b) - torch.eye(b)  # positives at 0, negatives at 1: the sigmoid extremes
    loss, diag = inbatch_infonce(TableEnergy(table), ids_batch(b), tau=tau)
    assert loss.item() == pytest.approx(math.log(1 + (b - 1) * math.exp(-1 / tau)), abs=1e-6)
    assert infonce_bounds(b, tau, 1.0)["floor"] == pytest.approx(loss.item(), abs=1e-6)
    assert diag["E_pos"].item() == 0.0 and diag["E_neg"].item() == 1.0


def test_bounds_by_hand():
    bounds = infonce_bounds(24, 2.0, 1.0)
    assert bounds["chance"] == pytest.approx(math.log(24))
    assert bounds["floor"] == pytest.approx(math.log(1 + 23 * math.exp(-0.5)))
    assert bounds["worst"] == pytest.approx(math.log(1 + 23 * math.exp(0.5)))


def test_energy_matrix_orientation_and_chunking():
    b = 5
    table = torch.randn(b, b)
    model = TableEnergy(table)
    batch = ids_batch(b)
    full = energy_matrix(model, batch["h"], batch["a_pos"])
    assert torch.equal(full, table)  # row i = context i, column j = action j
    for max_pairs in (1, 5, 7, 24):
        assert torch.equal(
            energy_matrix(model, batch["h"], batch["a_pos"], max_pairs=max_pairs), table
        )


def test_margin_sign_convention():
    b = 4
    neg_ids = torch.full((b, 1, 1, 1), 0.0)
    model = TableEnergy(torch.tensor([[5.0, 0, 0, 0]] * b))
    batch = ids_batch(b, {"a_neg": neg_ids})
    # positives (ids 1..3 -> energy 0) sit 5 below the negative (id 0 -> energy 5): no loss
    loss, _ = margin(model, {**batch, "a_pos": torch.ones(b, 1, 1)}, margin=0.5)
    assert loss.item() == 0.0
    # a positive *above* its negative is penalised by the gap plus the margin
    flipped = TableEnergy(torch.tensor([[0.0, 5, 5, 5]] * b))
    loss, _ = margin(flipped, {**batch, "a_pos": torch.ones(b, 1, 1)}, margin=0.5)
    assert loss.item() == pytest.approx(5.5)


def test_infonce_with_layer_action_negatives():
    b, tau = 3, 1.0
    table = torch.tensor([[0.0, 1.0, 2.0]] * b)
    batch = ids_batch(
        b, {"layer_actions.0": torch.ones(b, 1, 1), "layer_actions.1": torch.full((b, 1, 1), 2.0)}
    )
    batch["a_pos"] = torch.zeros(b, 1, 1)
    loss, _ = infonce_negatives(TableEnergy(table), batch, tau=tau)
    expected = -math.log(1 / (1 + math.exp(-1) + math.exp(-2)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


class TupleEnergy(TableEnergy):
    """Some versions of the team's model return (energy, per-step energies) and take options."""

    def forward(self, h, a, pad_mask=None, return_steps=True, scale=1.0):
        e = super().forward(h, a, pad_mask) * scale
        return (e, e.repeat(1, 4)) if return_steps else e


def test_tuple_forward_and_forward_kwargs():
    from energydiag.engine.plugins import build_model
    from energydiag.io.manifest import ModelSpec

    b = 4
    table = torch.randn(b, b)
    loss, _ = inbatch_infonce(TupleEnergy(table), ids_batch(b), tau=1.0)
    expected = torch.nn.functional.cross_entropy(-table, torch.arange(b))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    model = build_model(
        ModelSpec("test_losses:make_tuple_energy", {"b": b}, {"scale": 2.0, "return_steps": False})
    )
    e = energy_matrix(model, ids_batch(b)["h"], ids_batch(b)["a_pos"])
    assert torch.allclose(e, 2 * model.table.detach())
    assert set(model.state_dict()) == {"table"}  # the bound kwargs change nothing else


def make_tuple_energy(b):
    return TupleEnergy(torch.randn(b, b))


def test_explicit_negatives_report_candidate_energies():
    from energydiag.contrastive.quantities import energy_stats

    b = 3
    table = torch.tensor([[0.0, 1.0, 3.0]] * b)
    batch = ids_batch(
        b, {"layer_actions.0": torch.ones(b, 1, 1), "layer_actions.1": torch.full((b, 1, 1), 2.0)}
    )
    batch["a_pos"] = torch.zeros(b, 1, 1)
    for loss_fn, kwargs in ((infonce_negatives, {"tau": 1.0}), (margin, {"margin": 0.5})):
        _, diag = loss_fn(TableEnergy(table), batch, **kwargs)
        assert torch.equal(diag["candidate_energies"], table)
    stats = energy_stats(table, tau=1.0, positive_first=True)
    assert stats["pos_mean"].item() == 0.0 and stats["neg_mean"].item() == 2.0
    assert stats["retrieval_accuracy"].item() == 1.0 and stats["logit_spread"].item() == 3.0
