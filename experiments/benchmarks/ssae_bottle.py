"""SSAE next to PaDiM on MVTec AD bottle at a CPU size: python experiments/benchmarks/ssae_bottle.py

Each measurement runs in a fresh interpreter (peak memory per task, as in measure.py):
- ssae: our SSAE (Table 1 network, objective Eq. 1) trained `--epochs` epochs at `--image-size`
  (progressive resizing: the first half of the epochs at half the size), then validated (thresholds,
  on held-out normals) and tested through our datamodule, Trainer, Evaluator and DefectAreaEvaluator;
- padim: our PaDiM (ResNet-18, random initialisation: no weights offline) at the same size, same callbacks;
- forward: the bare SSAE network's forward (inference) and forward + backward + Adam step on random
  images of the same size: the limits of the pipeline's test and training throughput.
Writes experiments/benchmarks/results/ssae_bottle.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time

from measure import (
    BOTTLE,
    entry_point,
    machine_info,
    markdown_table,
    peak_rss_mb,
    run_task,
    write_results,
)

MIN_DEFECT_AREA = 0.001


def epoch_timer():
    import pytorch_lightning as pl

    class EpochTimer(pl.Callback):
        """Wall time of the training epochs alone (validation excluded)."""

        def __init__(self):
            self.seconds, self._start = 0.0, 0.0

        def on_train_epoch_start(self, trainer, pl_module):
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds += time.perf_counter() - self._start

    return EpochTimer()


def run_model(model: str, image_size: int, epochs: int, seed: int, num_workers: int) -> dict:
    import pytorch_lightning as pl

    from anomaly_lab.data import MVTecDataModule
    from anomaly_lab.evaluation import DefectAreaEvaluator, Evaluator
    from anomaly_lab.models import Padim, Ssae

    pl.seed_everything(seed, verbose=False)
    if model == "ssae":
        norm = {"mean": [0, 0, 0], "std": [1, 1, 1], "batch_size": 8}
        schedule = [[0, 0.5], [epochs // 2, 1.0]] if epochs > 1 else None
        net = Ssae(objective=1, progressive_resizing=schedule, seed=seed)
    else:
        norm = {"batch_size": 32}
        net = Padim(backbone="resnet18", backbone_weights=None, n_features=100, seed=seed)
    datamodule = MVTecDataModule(BOTTLE.parent, BOTTLE.name, image_size=image_size,
                                 num_workers=num_workers, seed=seed, **norm)
    evaluator, area, timer = Evaluator(), DefectAreaEvaluator(min_defect_area=MIN_DEFECT_AREA), epoch_timer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=max(epochs, 1), callbacks=[evaluator, area, timer],
                         **net.trainer_settings)
    start = time.perf_counter()
    if net.needs_training:
        trainer.fit(net, datamodule=datamodule)  # validates once at the end: thresholds
    else:
        trainer.validate(net, datamodule=datamodule, verbose=False)  # Gaussian fit, then thresholds
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    trainer.test(net, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    train_images, test_images = len(datamodule.train_set), len(datamodule.test_set)
    result = {
        "model": model, "image_size": image_size, "seed": seed,
        **{k: evaluator.results[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1", "pixel_f1")},
        **{f"defect_area_{k}": v for k, v in area.results.items()},
        "train_images": train_images, "fit_seconds": fit_seconds,
        "test_images": test_images, "test_seconds": test_seconds,
        "test_images_per_second": test_images / test_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }
    if net.needs_training:
        result.update(epochs=epochs, train_seconds=timer.seconds,
                      train_images_per_second=train_images * epochs / timer.seconds)
    return result


def bare_forward(image_size: int, repeats: int) -> dict:
    import torch

    from anomaly_lab.models.ssae.network import SsaeNet

    torch.manual_seed(0)
    net, images = SsaeNet(), torch.rand(8, 3, image_size, image_size)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.eval()
    with torch.inference_mode():
        net(images)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            net(images)
        forward = repeats * len(images) / (time.perf_counter() - start)
    net.train()
    start = time.perf_counter()
    for _ in range(repeats):
        optimizer.zero_grad()
        net(images).mean().backward()
        optimizer.step()
    train = repeats * len(images) / (time.perf_counter() - start)
    return {"image_size": image_size, "forward_images_per_second": forward, "train_step_images_per_second": train,
            "peak_rss_mb": peak_rss_mb()}


TASKS = {"model": run_model, "forward": bare_forward}


def markdown(record: dict) -> str:
    ssae, padim, forward = record["ssae"], record["padim"], record["ssae_bare"]
    rows = [("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("pixel AUPRO (0.3)", "pixel_aupro"),
            ("image F1-max", "image_f1"), ("pixel F1-max", "pixel_f1"),
            ("TPR (min-area threshold)", "defect_area_tpr"), ("TNR (min-area threshold)", "defect_area_tnr"),
            ("mean of TPR and TNR", "defect_area_tpr_tnr_mean"), ("image F1 (min-area threshold)", "defect_area_image_f1"),
            ("pixel F1 (min-area threshold)", "defect_area_pixel_f1"),
            ("test images/s", "test_images_per_second"), ("peak memory (MiB)", "peak_rss_mb"),
            ("fit wall time (s)", "fit_seconds")]
    lines = [f"# SSAE vs PaDiM, MVTec AD bottle, {ssae['image_size']} px, CPU", "",
             f"SSAE: objective Eq. 1, {ssae['epochs']} epochs (progressive: first half at half size), batch 8, Adam 1e-3. "
             "PaDiM: ResNet-18 with random weights (no download here). Minimum defect area "
             f"{MIN_DEFECT_AREA} of the image. Measured {record['date']} on {record['machine']['cpu_count']} cores "
             f"(load average {record['machine']['load_average_start'][0]} at the start).", "",
             *markdown_table(["metric", "SSAE", "PaDiM"],
                             [(label, f"{ssae[key]:.4g}", f"{padim[key]:.4g}") for label, key in rows])]
    lines += ["", f"SSAE training: {ssae['train_images_per_second']:.3g} images/s over {ssae['train_images']} images "
              f"x {ssae['epochs']} epochs ({ssae['train_seconds']:.0f} s).",
              f"Bare SSAE network at {forward['image_size']} px, batch 8: forward {forward['forward_images_per_second']:.3g} "
              f"images/s (pipeline test throughput is {ssae['test_images_per_second'] / forward['forward_images_per_second']:.2f} of it), "
              f"forward + backward + Adam {forward['train_step_images_per_second']:.3g} images/s (training pipeline: "
              f"{ssae['train_images_per_second'] / forward['train_step_images_per_second']:.2f} of it).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args()
    if not BOTTLE.is_dir():
        sys.exit(f"{BOTTLE} not found: put MVTec AD's bottle category there")
    common = {"image_size": args.image_size, "seed": args.seed, "num_workers": args.num_workers}
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(),
        "padim": run_task(__file__, "model", model="padim", epochs=0, **common),
        "ssae": run_task(__file__, "model", model="ssae", epochs=args.epochs, **common),
        "ssae_bare": run_task(__file__, "forward", image_size=args.image_size, repeats=3),
    }
    write_results("ssae_bottle", record, markdown(record))


if __name__ == "__main__":
    entry_point(TASKS, main)
