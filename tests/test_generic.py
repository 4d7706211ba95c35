"""A model that is not an energy model records, replays and localises its fault with no energy
vocabulary anywhere in what energydiag says about it."""

from __future__ import annotations

import json
import re

import torch
from torch import nn
from trainer_models import FEATURES, Standardise
from typer.testing import CliRunner

from energydiag import Recorder
from energydiag.cli import app

runner = CliRunner()
CLASSES, PLANTED = 3, 7
ENERGY_WORDS = re.compile(r"energ|\btau\b|infonce|logit|negative|contrastive|a_pos", re.I)


class Classifier(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.norm = Standardise()
        self.body = nn.Sequential(
            nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))


def classification_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"]), {}


def _record(root) -> None:
    """A plain loop: SGD, clip_grad_norm_, a StepLR; at step 7 one sample's features are equal."""
    torch.manual_seed(0)
    model = Classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    spec = {"target": "test_generic:Classifier", "kwargs": {}}
    loss = {"target": "test_generic:classification_loss"}
    with Recorder(
        root, model=model, optimizer=optimizer, model_spec=spec, loss=loss, grad_clip=1.0,
        checkpoint_every=5, persist_batches=True,
    ) as rec:  # fmt: skip
        for step in range(12):
            x, y = torch.randn(16, FEATURES), torch.randint(0, CLASSES, (16,))
            if step == PLANTED:
                x[2] = 0.5
            batch = {"x": x, "y": y}
            rec.start_step(step, batch)
            optimizer.zero_grad(set_to_none=True)
            value, _ = classification_loss(model, batch)
            value.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if rec.end_step(value, grad_norm=norm):
                optimizer.step()
            schedule.step()


def test_a_classifier_is_localised_with_no_energy_vocabulary(tmp_path):
    run = tmp_path / "run"
    _record(run)
    for argv in (["replay", str(run), "--from-step", "5"], ["diagnose", str(run)]):
        result = runner.invoke(app, [*argv, "--json"])
        assert result.exit_code == 1, result.stderr
        data = json.loads(result.stdout)
        fault = data["fault"]
        assert (fault["step"], fault["phase"], fault["module"]) == (PLANTED, "forward", "norm")
        assert fault["op"]["op"] == "aten::div"
        assert ENERGY_WORDS.findall(result.stdout) == [], argv
        shown = runner.invoke(app, argv)
        assert ENERGY_WORDS.findall(shown.stdout) == [], shown.stdout
