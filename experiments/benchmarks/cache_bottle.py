"""data.cache on MVTec AD bottle: the cost of building a disk cache, and one FYD and one CPC-AD training
epoch with and without it.   python experiments/benchmarks/cache_bottle.py [--data-root DIR]

Each measurement runs in a fresh interpreter (this file re-invoked with `task ...`), one after the other:
- build: a disk cache of bottle's training normals and test images (`data.cache=disk` as setup builds
  it, into an empty folder), at 256 px (PaDiM, CPC-AD) and 224 px (FYD): seconds and bytes; from the
  bytes per image, the size for all of MVTec AD at 256 px (its 3,629 training and 1,725 test images,
  1,258 of them with a mask);
- epoch: one training epoch (the fit loop alone, timed between the epoch's start and end) of FYD
  (ResNet-18 at random initialisation, 224 px, batch 32, the model config's settings) and of CPC-AD
  (cpc_ad_bottle.py's 256 px setting) with `data.cache` none, then disk (the cache built before); then
  that epoch's training loader alone (no model): what decoding and augmenting cost.
Writes results/cache_bottle.json and .md (latest run, and one history line per run).
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

from cpc_ad_bottle import BATCH_SIZE as CPC_BATCH_SIZE
from cpc_ad_bottle import IMAGE_SIZE as CPC_IMAGE_SIZE
from cpc_ad_bottle import model_kwargs as cpc_ad_kwargs
from measure import (
    BOTTLE,
    RESULTS,
    entry_point,
    load_average,
    machine_info,
    markdown_table,
    run_task,
    write_results,
)

MVTEC_IMAGES, MVTEC_MASKS = 3629 + 1725, 1258
FYD_IMAGE_SIZE, FYD_BATCH_SIZE = 224, 32
NUM_WORKERS = 2


def datamodule(category_dir: Path, cache: str, cache_dir: str, **kwargs):
    from anomaly_lab.data import MVTecDataModule

    return MVTecDataModule(category_dir.parent, category_dir.name, num_workers=NUM_WORKERS, cache=cache,
                           cache_dir=cache_dir, **kwargs)


def build(category_dir: str, cache_dir: str, image_size: int) -> dict:
    """Build the disk cache of bottle at `image_size` into `cache_dir` (empty): seconds and bytes."""
    category_dir, folder = Path(category_dir), Path(cache_dir)
    module = datamodule(category_dir, "disk", cache_dir, image_size=image_size)
    start = time.perf_counter()
    module.setup()
    seconds = time.perf_counter() - start
    images = len({s for s in module.normal_set.samples + module.val_set.samples + module.test_set.samples})
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"image_size": image_size, "images": images, "seconds": seconds, "bytes": total}


def epoch(category_dir: str, cache_dir: str, method: str, cache: str) -> dict:
    """One training epoch of `method` (fyd or cpc_ad) with `cache`: its wall time and images/s."""
    import albumentations as A
    import pytorch_lightning as pl

    from anomaly_lab.models import CPCAD, FYD

    category_dir = Path(category_dir)
    pl.seed_everything(0, verbose=False)
    if method == "fyd":
        module = datamodule(category_dir, cache, cache_dir, image_size=FYD_IMAGE_SIZE, batch_size=FYD_BATCH_SIZE)
        model = FYD(backbone="resnet18", backbone_weights=None, seed=0)
    else:
        augmentations = [A.RandomResizedCrop(size=(CPC_IMAGE_SIZE, CPC_IMAGE_SIZE), scale=(0.64, 1.0),
                                             ratio=(1.0, 1.0)), A.HorizontalFlip(p=0.5)]
        module = datamodule(category_dir, cache, cache_dir, image_size=CPC_IMAGE_SIZE, channels=1,
                            batch_size=CPC_BATCH_SIZE, train_augmentations=augmentations)
        model = CPCAD(**cpc_ad_kwargs(0))

    class EpochTimer(pl.Callback):
        """The wall time of the training epoch, loader start included."""

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.seconds = time.perf_counter() - self.start

    timer = EpochTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, max_epochs=1,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], **model.trainer_settings)
    trainer.fit(model, datamodule=module)
    start = time.perf_counter()
    for _ in module.train_dataloader():  # the same epoch's loader alone: decoding (uncached) and augmentations
        pass
    loader_seconds = time.perf_counter() - start
    images = len(module.train_set)
    return {"method": method, "cache": cache, "train_images": images, "epoch_seconds": timer.seconds,
            "train_images_per_second": images / timer.seconds, "loader_seconds": loader_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=BOTTLE, help="the MVTec AD bottle folder")
    args = parser.parse_args()
    category_dir = str(args.data_root.expanduser().resolve())
    started, machine = time.time(), machine_info()
    with tempfile.TemporaryDirectory() as scratch:
        builds = [run_task(__file__, "build", category_dir=category_dir, cache_dir=f"{scratch}/{size}",
                           image_size=size) for size in (CPC_IMAGE_SIZE, FYD_IMAGE_SIZE)]
        cache_dirs = {"fyd": f"{scratch}/{FYD_IMAGE_SIZE}", "cpc_ad": f"{scratch}/{CPC_IMAGE_SIZE}"}
        epochs = [run_task(__file__, "epoch", category_dir=category_dir, cache_dir=cache_dirs[method],
                           method=method, cache=cache) for method in ("fyd", "cpc_ad") for cache in ("none", "disk")]
    at_256 = next(b for b in builds if b["image_size"] == 256)
    image_bytes, mask_bytes = 256 * 256 * 3, 256 * 256
    record = {
        "benchmark": "data.cache on MVTec AD bottle: disk cache build, FYD and CPC-AD training epochs",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {**machine, "load_average_end": load_average()},
        "builds": builds,
        "mvtec_256px_bytes": MVTEC_IMAGES * image_bytes + MVTEC_MASKS * mask_bytes,
        "bottle_256px_overhead": at_256["bytes"] / (at_256["images"] * image_bytes),
        "epochs": epochs,
        "speedups": {method: _rate(epochs, method, "disk") / _rate(epochs, method, "none") for method in ("fyd", "cpc_ad")},
        "runtime_seconds": round(time.time() - started, 1),
    }
    write_results("cache_bottle", record, render_markdown(record, _history(RESULTS / "cache_bottle.md")))


def _rate(epochs: list[dict], method: str, cache: str) -> float:
    return next(e["train_images_per_second"] for e in epochs if e["method"] == method and e["cache"] == cache)


def _history(markdown: Path) -> list[str]:
    if not markdown.exists():
        return []
    return [row for row in markdown.read_text().split("## History", 1)[-1].splitlines() if row.startswith("| 2")]


def render_markdown(record: dict, earlier_rows: list[str]) -> str:
    machine, speedups = record["machine"], record["speedups"]
    builds = [[f"{b['image_size']} px", b["images"], f"{b['seconds']:.1f}", f"{b['bytes'] / 2**20:.1f}",
               f"{b['images'] / b['seconds']:.1f}"] for b in record["builds"]]
    epochs = [[e["method"], e["cache"], e["train_images"], f"{e['epoch_seconds']:.1f}",
               f"{e['train_images_per_second']:.2f}", f"{e['loader_seconds']:.1f}"] for e in record["epochs"]]
    row = (f"| {record['date']} | {speedups['fyd']:.2f} | {speedups['cpc_ad']:.2f} | "
           f"{record['builds'][0]['seconds']:.1f} | {record['mvtec_256px_bytes'] / 2**30:.2f} |")
    goal = ", ".join(f"{m} {speedups[m]:.2f}x ({'met' if speedups[m] >= 1.5 else '**not met**'})" for m in speedups)
    return "\n".join([
        "# data.cache on MVTec AD bottle", "",
        f"Latest run {record['date']}: {machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['torch']}; load "
        f"average {machine['load_average_start'][0]} at the start, {machine['load_average_end'][0]} at the end; "
        f"{record['runtime_seconds'] / 60:.1f} min; {NUM_WORKERS} loader workers. Written by `cache_bottle.py`; "
        "every number is in `cache_bottle.json`.", "",
        "Disk cache build (training normals and test images, into an empty folder):", "",
        *markdown_table(["size", "images", "seconds", "MiB", "images/s"], builds), "",
        f"All of MVTec AD at 256 px: {record['mvtec_256px_bytes'] / 2**30:.2f} GiB "
        f"({MVTEC_IMAGES} images x 256 x 256 x 3 bytes + {MVTEC_MASKS} masks x 256 x 256 bytes; bottle's cache "
        f"holds {record['bottle_256px_overhead']:.2f} x its images' bytes).", "",
        "One training epoch:", "",
        *markdown_table(["method", "data.cache", "images", "epoch seconds", "images/s", "loader alone, seconds"], epochs),
        "",
        f"Speed-up of an epoch with the disk cache (goal >= 1.5x): {goal}.", "",
        "## History", "",
        "| date | FYD epoch speed-up | CPC-AD epoch speed-up | build s (256 px) | MVTec 256 px GiB |",
        "|---|---|---|---|---|",
        *earlier_rows, row, "",
    ])


if __name__ == "__main__":
    entry_point({"build": build, "epoch": epoch}, main)
