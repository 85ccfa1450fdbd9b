"""Composing the project's real configs in tests."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import numpy as np
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


# Tiny runs: 64 px synthetic textures, 12 training normals, one epoch of at most two steps.
TINY_RUN = ["data=synthetic/texture", "data.image_size=64", "data.n_train=12", "data.n_test_good=2",
            "data.n_test_per_defect=1", "data.batch_size=4", "trainer.max_epochs=1", "++trainer.limit_train_batches=2",
            "callbacks=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def toy_image(target: int, rng: np.random.Generator) -> np.ndarray:
    """RGB [32, 32, 3]: a grating oriented by the class (18 degrees apart), random phase, frequency,
    colour and noise, so that only the orientation tells the classes apart."""
    angle = np.pi * target / 10
    yy, xx = np.mgrid[0:32, 0:32]
    frequency, phase = rng.uniform(0.5, 0.8), rng.uniform(0, 2 * np.pi)
    wave = np.sin(frequency * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    colour = rng.uniform(0.3, 1.0, size=3)
    image = 127.5 + 100 * wave[..., None] * colour + rng.normal(0, 10, (32, 32, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_toy_cifar10(root: Path, per_class_train: int, per_class_test: int, seed: int = 0) -> Path:
    """`root/cifar-10-batches-py` in CIFAR-10's pickle layout holding `toy_image`s of the 10 classes."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, targets: list[int]) -> None:
        images = np.stack([toy_image(t, rng) for t in targets]) if targets else np.zeros((0, 32, 32, 3), np.uint8)
        entry = {"data": images.transpose(0, 3, 1, 2).reshape(len(targets), -1), "labels": targets}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))

    train_targets = [c for _ in range(per_class_train) for c in range(10)]
    for b in range(5):
        write(f"data_batch_{b + 1}", train_targets[b::5])
    write("test_batch", [c for _ in range(per_class_test) for c in range(10)])
    return folder


def synthetic_dir(data_root: Path, kind: str = "texture") -> Path:
    """The one generated `kind` dataset under `data_root/synthetic` (its folder is named `<kind>-<key>`)."""
    (folder,) = (data_root / "synthetic").glob(f"{kind}-*")
    return folder
