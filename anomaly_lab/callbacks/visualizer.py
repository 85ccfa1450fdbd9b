"""Saves a few `image | ground truth | heatmap | overlay` panels of the test set."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from anomaly_lab.data import Batch


def heatmap_panel(image: np.ndarray, mask: np.ndarray | None, heat: np.ndarray) -> np.ndarray:
    """One RGB uint8 strip from an RGB image in [0, 1], a binary mask (or None) and a heat map in [0, 1]."""
    height, width = heat.shape
    rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    truth = np.repeat((mask if mask is not None else np.zeros_like(heat))[..., None] * 255, 3, axis=2)
    colored = cv2.cvtColor(cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET),
                           cv2.COLOR_BGR2RGB)
    overlay = cv2.addWeighted(rgb, 0.5, colored, 0.5, 0)
    gap = np.full((height, 4, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, truth.astype(np.uint8), gap, colored, gap, overlay], axis=1)


class Visualizer(pl.Callback):
    """Keeps the first `max_images` test images (half anomalous, half normal where possible) and saves
    their panels as PNG files in `output_dir` at the end of the test, sending them to image loggers too.

    Heat maps share one colour scale: from the smallest to the largest value among the kept maps.
    """

    def __init__(self, output_dir: str, max_images: int = 6):
        self.output_dir = Path(output_dir)
        self.max_images = max_images
        self._kept: list[tuple] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._kept = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch: Batch, batch_idx, dataloader_idx=0) -> None:
        if outputs.get("anomaly_map") is None:
            return
        datamodule = trainer.datamodule
        mean = torch.as_tensor(getattr(datamodule, "mean", (0.0,)), device=batch.image.device).view(1, -1, 1, 1)
        std = torch.as_tensor(getattr(datamodule, "std", (1.0,)), device=batch.image.device).view(1, -1, 1, 1)
        images = (batch.image * std + mean).expand(-1, 3, -1, -1) if batch.image.shape[1] == 1 else batch.image * std + mean
        for i in range(len(batch)):
            label = int(batch.label[i])
            quota = (self.max_images + 1) // 2 if label else self.max_images // 2
            if sum(1 for kept in self._kept if kept[0] == label) >= quota:
                continue
            mask = None if batch.mask is None else batch.mask[i, 0].cpu().numpy()
            self._kept.append((label, batch.path[i], images[i].permute(1, 2, 0).cpu().numpy(), mask,
                               outputs["anomaly_map"][i, 0].float().cpu().numpy()))

    @rank_zero_only
    def on_test_end(self, trainer, pl_module) -> None:
        if not self._kept:
            return
        low = min(k[4].min() for k in self._kept)
        high = max(k[4].max() for k in self._kept)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        panels = {}
        for label, path, image, mask, heat in self._kept:
            panel = heatmap_panel(image, mask, (heat - low) / max(high - low, 1e-12))
            name = f"{'anomalous' if label else 'normal'}_{Path(path).parent.name}_{Path(path).stem}"
            cv2.imwrite(str(self.output_dir / f"{name}.png"), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
            panels[name] = panel
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, panel in panels.items():
                    logger.experiment.add_image(f"test/{name}", panel, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image(key="test/heatmaps", images=list(panels.values()), caption=list(panels))
