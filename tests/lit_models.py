"""The LightningModules the Lightning tests train, apart from ``trainer_models`` so that
importing those models (every test worker does while collecting) does not import lightning,
which takes seconds."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from trainer_models import Regressor, lr_ramp, swap_infonce

from energydiag.reference.models import EnergyModel


def quiet_trainer(**options) -> pl.Trainer:
    """A CPU Trainer that writes and prints nothing of its own; ``options`` override."""
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    return pl.Trainer(accelerator="cpu", **(quiet | {"enable_model_summary": False} | options))


class LitRegressor(pl.LightningModule):
    def __init__(
        self, hidden: int = 16, dropout: float = 0.1, lr: float = 1e-2, ramp: float = 0.0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = Regressor(hidden, dropout)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.net(x, labels=y)["loss"]
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        sched = lr_ramp(opt, self.hparams.ramp) or torch.optim.lr_scheduler.StepLR(
            opt, step_size=4, gamma=0.5
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LitEnergy(pl.LightningModule):
    """The same energy model under Lightning: no ``forward``, ``training_step`` calls the
    submodule, AdamW at a constant lr."""

    def __init__(self, lr: float = 3e-3, tau: float = 0.5, **model_kwargs) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.energy = EnergyModel(**model_kwargs)

    def training_step(self, batch, batch_idx):
        return swap_infonce(self.energy, batch, self.hparams.tau)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
