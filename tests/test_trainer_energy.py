"""The energy rules under both trainers (issue 24): a trainer's loss is its own step, so the
callback is told where the energy model is (``energy=``); a sigmoid head drifting into
saturation and a loss pinned at chance alarm through Lightning and the Hugging Face Trainer as
they do through a hand-written loop, and healthy runs stay quiet past every rule's warm-up."""

from __future__ import annotations

import math

import pytest
import torch
from handloop import SMALL
from test_energy_alarms import STEPS, alerts, first_of, offline, rows

from energydiag.reference.synthetic import Task, batches

SATURATING = {"lr": 0.05, "head": "sigmoid", "tau": 0.5}  # AdamW under either trainer
AT_CHANCE = {"lr": 1e-5, "head": "identity", "tau": 5.0}
HEALTHY = {"lr": 3e-3, "head": "sigmoid", "tau": 0.5}


def watching(tau: float) -> dict:
    loss = {"name": "inbatch_infonce", "kwargs": {"tau": tau}}
    return {"module": "energy", "loss": loss}


def data(steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    stream = batches(Task(), seed=1 + seed)
    return [next(stream) for _ in range(steps)]


def fit_lightning(
    root, steps: int, lr: float, head: str, tau: float, seed: int = 0, accumulate: int = 1
) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lit_models import LitEnergy, quiet_trainer

    from energydiag.record.lightning import EnergydiagCallback

    pl.seed_everything(seed, verbose=False)
    loader = torch.utils.data.DataLoader(data(steps * accumulate, seed), batch_size=None)
    callback = EnergydiagCallback(root, checkpoint_every=100, energy=watching(tau))
    trainer = quiet_trainer(
        max_steps=steps,
        gradient_clip_val=1.0,
        accumulate_grad_batches=accumulate,
        callbacks=[callback],
    )
    trainer.fit(LitEnergy(lr=lr, tau=tau, **SMALL, head=head), loader)


def fit_hf(root, steps: int, lr: float, head: str, tau: float, seed: int = 0) -> None:
    transformers = pytest.importorskip("transformers")
    from trainer_models import SwapEnergy, hf_arguments

    from energydiag.record.hf import EnergydiagCallback

    transformers.set_seed(seed)
    kwargs = {"tau": tau, **SMALL, "head": head}
    spec = {"target": "trainer_models:SwapEnergy", "kwargs": kwargs}
    callback = EnergydiagCallback(root, model_spec=spec, checkpoint_every=100, energy=watching(tau))
    samples = [
        {key: value[i] for key, value in batch.items()}
        for batch in data(steps, seed)
        for i in range(Task().batch)
    ]
    args = hf_arguments(
        root.parent / "hf-out",
        steps,
        Task().batch,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
        dataloader_num_workers=0,
        seed=seed,
    )
    model = SwapEnergy(**kwargs)
    transformers.Trainer(model, args, train_dataset=samples, callbacks=[callback]).train()


FITS = {"lightning": fit_lightning, "hf": fit_hf}


@pytest.mark.parametrize("trainer", FITS)
def test_a_sigmoid_head_drifting_into_saturation_under_a_trainer(tmp_path, trainer):
    FITS[trainer](tmp_path / "run", 80, **SATURATING)
    first = next(a for a in alerts(tmp_path / "run") if a["rule"] == "saturation")
    assert first["evidence"]["saturation"] >= 0.9 and first["step"] <= 60
    assert offline(tmp_path / "run") == first_of(tmp_path / "run")


@pytest.mark.parametrize("trainer", FITS)
def test_a_loss_pinned_at_chance_under_a_trainer(tmp_path, trainer):
    FITS[trainer](tmp_path / "run", STEPS, **AT_CHANCE)
    assert first_of(tmp_path / "run") == {"loss_at_chance": 140}
    assert offline(tmp_path / "run") == {"loss_at_chance": 140}


@pytest.mark.parametrize(("trainer", "seed"), [("lightning", 0), ("lightning", 1), ("hf", 0)])
def test_healthy_energy_runs_under_a_trainer_stay_quiet(tmp_path, trainer, seed):
    FITS[trainer](tmp_path / "run", STEPS, **HEALTHY, seed=seed)
    assert alerts(tmp_path / "run") == [] and offline(tmp_path / "run") == {}
    watched = rows(tmp_path / "run")[100]
    assert {"saturation", "logit_spread", "chance_loss", "loss_floor"} <= set(watched)


def test_the_energy_rules_watch_accumulated_steps_too(tmp_path):
    """Two micro-batches per step: the head is found on the first one, chance is log of one
    micro-batch's B, and saturation still alarms."""
    fit_lightning(tmp_path / "run", 80, **SATURATING, accumulate=2)
    first = first_of(tmp_path / "run")
    assert first["saturation"] <= 60
    assert rows(tmp_path / "run")[0]["chance_loss"] == pytest.approx(math.log(Task().batch))


def test_energy_names_a_submodule_the_model_has(tmp_path):
    from energydiag.record.live import energy_target

    with pytest.raises(ValueError, match="no such submodule"):
        energy_target(torch.nn.Linear(1, 1), {"module": "energy", "loss": {"name": "margin"}})
    with pytest.raises(ValueError, match="takes 'module'"):
        energy_target(torch.nn.Linear(1, 1), {"module": ""})
