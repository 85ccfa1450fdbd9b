"""Early stopping that ends training on the best weights, not `patience` epochs after them."""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping


class EarlyStoppingOnBest(EarlyStopping):
    """Lightning's EarlyStopping on a validation metric, keeping a copy (on the CPU) of the model's weights
    at the best value and loading it back when training ends, so that the thresholds, the saved checkpoint
    and the test use the best epoch. The copy is part of the callback's checkpoint state: a resumed run
    ends on the same weights as an uninterrupted one. Every process keeps its own copy (the metric is
    synchronised, so all improve at the same epoch). Epochs before `start_epoch` are not watched (a
    schedule that changes the training, such as progressive resizing, has not reached its last stage)."""

    def __init__(self, monitor: str, patience: int, mode: str = "min", min_delta: float = 0.0, start_epoch: int = 0):
        super().__init__(monitor=monitor, patience=patience, mode=mode, min_delta=min_delta)
        self.start_epoch = start_epoch
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if trainer.current_epoch < self.start_epoch:
            return
        before = self.best_score.clone()
        super()._run_early_stopping_check(trainer)
        if not torch.equal(before, self.best_score):
            state = trainer.lightning_module.state_dict()
            self.best_weights = {key: value.detach().to("cpu", copy=True) for key, value in state.items()}
            self.best_epoch = trainer.current_epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.best_weights is not None:
            pl_module.load_state_dict(self.best_weights)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_weights": self.best_weights, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = copy.copy(state_dict)
        self.best_weights, self.best_epoch = state_dict.pop("best_weights", None), state_dict.pop("best_epoch", None)
        super().load_state_dict(state_dict)
