"""Writes the run's `metrics.json`: the test metrics with what is needed to compare runs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from anomaly_lab.evaluation import Evaluator


def git_commit(cwd: str | Path = ".") -> str | None:
    """The commit of the working tree holding `cwd`, with '-dirty' if it has changes; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


class ResultsWriter(pl.Callback):
    """Times fitting and testing, counts test images, and writes `metrics.json` on rank 0 at the end
    of a test that finished: a run that failed writes no metrics.

    `test_images_per_second` is the scoring throughput: images from the start of the test loop to
    its last batch (decoding, transforms, model, maps at input size), without the metrics computed
    once at the end, which `test_seconds` (the whole test stage) includes. The Evaluator's record
    (`pixel_resolution`, `pixel_histogram_bits`, `pixel_error_bounds`, per-defect `defects`) and the
    datamodule's `threshold_source` (where the thresholds' normal images come from) are written beside
    the metrics.
    """

    def __init__(self, output_path: str | Path, metadata: dict[str, Any]):
        self.output_path = Path(output_path)
        self.metadata = metadata
        self.fit_seconds = 0.0
        self._started = 0.0
        self._loop_started = 0.0
        self._last_batch_end = 0.0
        self._test_images = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_seconds += time.perf_counter() - self._started

    def on_test_start(self, trainer, pl_module) -> None:
        self._test_images = 0
        self._started = time.perf_counter()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._loop_started = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._test_images += len(batch)
        self._last_batch_end = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        test_seconds = time.perf_counter() - self._started
        scoring_seconds = self._last_batch_end - self._loop_started
        images = int(pl_module.sum_across_devices(pl_module.image_threshold.new_tensor(self._test_images)).item())
        metrics = {key.removeprefix("test/"): float(value) for key, value in trainer.callback_metrics.items()
                   if key.startswith("test/")}
        evaluation = next((c.record for c in trainer.callbacks if isinstance(c, Evaluator)), {})
        self._write({
            **self.metadata,
            "metrics": metrics,
            **evaluation,
            **pl_module.training_record(),
            "threshold_source": getattr(trainer.datamodule, "threshold_source", None),
            "image_threshold": float(pl_module.image_threshold),
            "pixel_threshold": float(pl_module.pixel_threshold),
            "fit_seconds": round(self.fit_seconds + pl_module.fit_normal_seconds, 3),
            "test_seconds": round(test_seconds, 3),
            "test_images": images,
            "scoring_seconds": round(scoring_seconds, 3),
            "test_images_per_second": round(images / scoring_seconds, 3) if scoring_seconds > 0 else None,
            "devices": trainer.world_size,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

    @rank_zero_only
    def _write(self, record: dict[str, Any]) -> None:
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        self.output_path.write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
