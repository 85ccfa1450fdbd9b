"""Composing the project's real configs in tests."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from pytorch_lightning import Callback

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"


def compose_config(name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose `conf/<name>.yaml` with overrides, outside a Hydra app (paths.output_dir set explicitly)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


class KillAtStep(Callback):
    """Kills its own process with SIGKILL before training step `step`: an interruption nothing can clean up."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
