"""CPC-AD next to PaDiM on MVTec AD bottle at a CPU size: python experiments/benchmarks/cpc_ad_bottle.py

Each measurement runs in a fresh interpreter (this file re-invoked with `task ...`), so that every peak
resident set size belongs to that task alone (as in measure.py):
- cpc_ad: our CPC-AD trained `--epochs` epochs from scratch (256 px images, 128 px patches, 32 px
  sub-patches, both with 50 % overlap: the paper's 768 / 256 / 64 px divided by three and by two), then
  validated (negative bank + thresholds on held-out normals) and tested through our datamodule,
  Trainer and Evaluator;
- padim: measure.py's `ours` task (PaDiM, ResNet-18 at random initialisation, 256 px), same seed;
- references: the limits of the test throughput: bare decoding + resizing of the test images
  (measure.references) and the bare encoder's forward over the same sub-patches, both the 225 distinct
  sub-patches of an image that our pipeline encodes and the 441 (9 patches x 49) that encoding every
  patch separately would take.
Writes experiments/benchmarks/results/cpc_ad_bottle.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from measure import (
    BOTTLE,
    HERE,
    entry_point,
    markdown_table,
    peak_rss_mb,
    run_task,
    write_results,
)

IMAGE_SIZE, PATCH, PATCH_STRIDE, SUBPATCH, SUBPATCH_STRIDE = 256, 128, 64, 32, 16
BATCH_SIZE = 16


def model_kwargs(seed: int) -> dict:
    return dict(patch_size=PATCH, patch_stride=PATCH_STRIDE, subpatch_size=SUBPATCH, subpatch_stride=SUBPATCH_STRIDE,
                encoder_chunk=1024, seed=seed)


def cpc_ad(category_dir: str, seed: int, epochs: int, num_workers: int) -> dict:
    import albumentations as A
    import pytorch_lightning as pl

    from anomaly_lab.data import MVTecDataModule
    from anomaly_lab.evaluation import Evaluator
    from anomaly_lab.models import CPCAD

    category_dir = Path(category_dir)
    pl.seed_everything(seed, verbose=False)
    augmentations = [A.RandomResizedCrop(size=(IMAGE_SIZE, IMAGE_SIZE), scale=(0.64, 1.0), ratio=(1.0, 1.0)),
                     A.HorizontalFlip(p=0.5)]
    datamodule = MVTecDataModule(category_dir.parent, category_dir.name, image_size=IMAGE_SIZE, channels=1,
                                 batch_size=BATCH_SIZE, num_workers=num_workers, seed=seed,
                                 train_augmentations=augmentations)
    model = CPCAD(**model_kwargs(seed))
    evaluator = Evaluator()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, max_epochs=epochs,
                         check_val_every_n_epoch=epochs, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[evaluator])
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    trainer.validate(model, datamodule=datamodule, verbose=False)
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    train_images, test_images = len(datamodule.train_set), len(datamodule.test_set)
    distinct = ((IMAGE_SIZE - SUBPATCH) // SUBPATCH_STRIDE + 1) ** 2
    return {
        "seed": seed,
        "epochs": epochs,
        "image_auroc": evaluator.results["image_auroc"],
        "pixel_auroc": evaluator.results["pixel_auroc"],
        "pixel_aupro": evaluator.results["pixel_aupro"],
        "train_images": train_images,
        "fit_seconds": fit_seconds,  # training epochs + the validation (bank) run at the last one
        "train_subpatches_per_second": epochs * train_images * distinct / fit_seconds,
        "test_images": test_images,
        "test_seconds": test_seconds,
        "test_images_per_second": test_images / test_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def references(category_dir: str, repeats: int) -> dict:
    import measure
    import torch

    from anomaly_lab.models import CPCAD
    from anomaly_lab.models.cpc_ad.patches import unfold_patches

    decode = measure.references(category_dir, repeats, image_size=IMAGE_SIZE)
    model = CPCAD(**model_kwargs(0)).eval()
    images = torch.randn(BATCH_SIZE, 1, IMAGE_SIZE, IMAGE_SIZE)
    distinct = unfold_patches(images, SUBPATCH, SUBPATCH_STRIDE).reshape(-1, 1, SUBPATCH, SUBPATCH)
    patches = unfold_patches(images, PATCH, PATCH_STRIDE).reshape(-1, 1, PATCH, PATCH)
    every = unfold_patches(patches, SUBPATCH, SUBPATCH_STRIDE).reshape(-1, 1, SUBPATCH, SUBPATCH)
    rates = {}
    with torch.inference_mode():
        for name, subpatches in (("distinct", distinct), ("per_patch", every)):
            chunks = subpatches.split(1024)
            model.encoder(chunks[0])  # warm-up
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                for chunk in chunks:
                    model.encoder(chunk)
                seconds.append(time.perf_counter() - start)
            rates[f"encoder_{name}_subpatches_per_image"] = len(subpatches) // BATCH_SIZE
            rates[f"encoder_{name}_images_per_second"] = BATCH_SIZE / statistics.median(seconds)
    return {"decode_resize_images_per_second": decode["decode_resize_images_per_second"], **rates}


TASKS = {"cpc_ad": cpc_ad, "references": references}


def markdown(record: dict) -> str:
    cpc, padim, ref = record["cpc_ad"], record["padim"], record["references"]
    limit = min(ref["encoder_distinct_images_per_second"], ref["decode_resize_images_per_second"])
    rows = markdown_table(["", "CPC-AD", "PaDiM"], [
        (label, format(cpc[key], fmt), format(padim[key], fmt))
        for label, key, fmt in [("image AUROC", "image_auroc", ".3f"), ("pixel AUROC", "pixel_auroc", ".3f"),
                                ("pixel AUPRO", "pixel_aupro", ".3f"), ("test images/s", "test_images_per_second", ".2f"),
                                ("peak memory (MiB)", "peak_rss_mb", ".0f")]
    ])
    return "\n".join([
        "# CPC-AD on MVTec AD bottle (CPU)", "",
        f"`python experiments/benchmarks/cpc_ad_bottle.py --epochs {cpc['epochs']}`: {IMAGE_SIZE} px grayscale images, "
        f"{PATCH} px patches, {SUBPATCH} px sub-patches (50 % overlap each), batch {BATCH_SIZE}, "
        f"{cpc['epochs']} epoch(s) from scratch (the paper trains 150 at 768 / 256 / 64 px); PaDiM: ResNet-18 at "
        "random initialisation, 256 px, same seed.", "",
        *rows, "",
        f"Training: {cpc['train_subpatches_per_second']:.0f} distinct sub-patches/s "
        f"({cpc['train_images']} images x {cpc['epochs']} epochs in {cpc['fit_seconds']:.0f} s).", "",
        f"Test throughput {cpc['test_images_per_second']:.2f} images/s against the bare encoder's forward over the "
        f"same {ref['encoder_distinct_subpatches_per_image']} distinct sub-patches per image "
        f"({ref['encoder_distinct_images_per_second']:.2f} images/s) and image decoding + resizing "
        f"({ref['decode_resize_images_per_second']:.1f} images/s): ratio "
        f"{cpc['test_images_per_second'] / limit:.2f} of the slower (goal >= 0.8). Encoding each patch's "
        f"{ref['encoder_per_patch_subpatches_per_image']} sub-patches separately would run the bare encoder at "
        f"{ref['encoder_per_patch_images_per_second']:.2f} images/s.", "",
        "The machine's 2 cores are shared with other jobs: timings are indicative.",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    category = str(BOTTLE)
    common = {"category_dir": category, "seed": args.seed, "num_workers": args.num_workers}
    record = {
        "cpc_ad": run_task(__file__, "cpc_ad", **common, epochs=args.epochs),
        "padim": run_task(HERE / "measure.py", "ours", **common),
        "references": run_task(__file__, "references", category_dir=category, repeats=args.repeats),
    }
    write_results("cpc_ad_bottle", record, markdown(record))


if __name__ == "__main__":
    entry_point(TASKS, main)
