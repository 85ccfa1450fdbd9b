"""FYD against PaDiM on MVTec AD bottle, same random-init ResNet-18, 224 px, CPU-sized training, one run.

    python experiments/benchmarks/fyd_bottle.py [--epochs N] [--seed S] [--num-workers W]

Each measurement runs in its own interpreter (this file re-invoked with `task ...`), so that every
peak resident set size belongs to one method alone. Writes `results/fyd_bottle.json` and `.md`:
image/pixel AUROC, AUPRO, training images/s (FYD), test images/s, peak memory, and the pipeline's
limits measured as in the core benchmark (`measure.references`: bare decoding + resizing, bare
backbone forward), here at 224 px.

No pretrained weights can be had here, so both methods start from the same random ResNet-18 (same
seed); FYD fine-tunes it with the paper's losses and optimiser for `--epochs` epochs only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from measure import (
    BOTTLE,
    HERE,
    bare_backbone,
    entry_point,
    load_average,
    machine_info,
    markdown_table,
    peak_rss_mb,
    run_task,
    write_results,
)

IMAGE_SIZE = 224
BATCH_SIZE = 32  # training and scoring (at 224 px, 32 scored faster here than 8 or 16)
TEST_PASSES = 3  # test stages per method; rates are their medians


def run_method(method: str, category_dir: str, seed: int, epochs: int, num_workers: int) -> dict:
    import pytorch_lightning as pl

    from anomaly_lab.callbacks import ResultsWriter
    from anomaly_lab.data import MVTecDataModule
    from anomaly_lab.evaluation import Evaluator
    from anomaly_lab.models import FYD, Padim

    category_dir = Path(category_dir)
    pl.seed_everything(seed, verbose=False)
    datamodule = MVTecDataModule(category_dir.parent, category_dir.name, image_size=IMAGE_SIZE,
                                 batch_size=BATCH_SIZE, num_workers=num_workers, seed=seed)
    if method == "fyd":
        model = FYD(backbone="resnet18", backbone_weights=None, seed=seed)
    else:
        model = Padim(backbone="resnet18", backbone_weights=None, n_features=100, seed=seed)
    baseline = peak_rss_mb()
    evaluator = Evaluator()
    scratch = Path(tempfile.mkdtemp())
    writer = ResultsWriter(scratch / "metrics.json", {})  # its scoring time is what metrics.json reports
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluator, writer],
                         max_epochs=epochs, check_val_every_n_epoch=max(epochs, 1), **model.trainer_settings)
    fit_seconds = 0.0
    if model.needs_training:
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - start - model.fit_normal_seconds  # training only
    trainer.validate(model, datamodule=datamodule)
    test_seconds, scoring_seconds = [], []
    for _ in range(TEST_PASSES):
        start = time.perf_counter()
        trainer.test(model, datamodule=datamodule)
        test_seconds.append(time.perf_counter() - start)
        scoring_seconds.append(json.loads((scratch / "metrics.json").read_text())["scoring_seconds"])
    shutil.rmtree(scratch)
    result = {
        "method": method,
        "seed": seed,
        "image_auroc": evaluator.results["image_auroc"],
        "pixel_auroc": evaluator.results["pixel_auroc"],
        "pixel_aupro": evaluator.results["pixel_aupro"],
        "train_images": len(datamodule.train_set),
        "epochs": epochs if model.needs_training else 0,
        "fit_normal_seconds": model.fit_normal_seconds,
        "test_images": len(datamodule.test_set),
        "test_seconds": statistics.median(test_seconds),  # the whole test stage, with the metrics at its end
        "scoring_seconds": scoring_seconds,
        "test_images_per_second": len(datamodule.test_set) / statistics.median(scoring_seconds),
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
    }
    result.update(forward_speed(model, datamodule))
    if model.needs_training:
        result["train_seconds"] = fit_seconds
        result["train_images_per_second"] = len(datamodule.train_set) * epochs / fit_seconds
    return result


def forward_speed(model, datamodule, repeats: int = 3) -> dict:
    """Images/s of the model's scoring (`model(images)`: map at input size, smoothed) and of the bare
    ResNet-18 layers 1-3 forward on the same decoded batch, interleaved, so both see the same machine load."""
    import torch

    images = next(iter(datamodule.test_dataloader())).image
    backbone = bare_backbone()
    model.eval()
    seconds = {"model": [], "bare": []}
    with torch.inference_mode():
        backbone(images), model(images)  # warm-up
        for _ in range(repeats):
            for name, run in (("model", lambda: model(images)), ("bare", lambda: backbone(images))):
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    model_rate = len(images) / statistics.median(seconds["model"])
    bare_rate = len(images) / statistics.median(seconds["bare"])
    return {"forward_images_per_second": model_rate, "bare_backbone_images_per_second": bare_rate,
            "forward_over_bare_backbone": model_rate / bare_rate}


TASKS = {"method": run_method}


def markdown(record: dict) -> str:
    fyd, padim, ref, machine = record["fyd"], record["padim"], record["references"], record["machine"]

    def both(label: str, key: str, fmt: str) -> tuple[str, str, str]:
        return label, format(fyd[key], fmt), format(padim[key], fmt)

    rows = [
        both("image AUROC", "image_auroc", ".4f"),
        both("pixel AUROC", "pixel_auroc", ".4f"),
        both("pixel AUPRO (FPR 0.3)", "pixel_aupro", ".4f"),
        ("training images/s", f"{fyd['train_images_per_second']:.2f}", "- (no training)"),
        both("test images/s (scoring: decode to map, as metrics.json; median of 3 test stages)",
             "test_images_per_second", ".2f"),
        both("whole test stage, s (+ exact metrics at the end)", "test_seconds", ".1f"),
        ("test images/s / pipeline limit (goal >= 0.8)", f"{record['fyd_test_ratio']:.2f}",
         f"{record['padim_test_ratio']:.2f}"),
        ("test images/s / bare pipeline", f"{record['fyd_bare_pipeline_ratio']:.2f}",
         f"{record['padim_bare_pipeline_ratio']:.2f}"),
        both("scoring forward / bare backbone forward (same batch, same process)", "forward_over_bare_backbone", ".2f"),
        both("peak RSS (MiB)", "peak_rss_mb", ".0f"),
    ]
    lines = [
        "# FYD vs PaDiM on MVTec AD bottle",
        "",
        f"Random-init ResNet-18 (same seed {record['seed']}) for both, {IMAGE_SIZE} x {IMAGE_SIZE}, batch {BATCH_SIZE}, "
        f"2 loader workers, FYD trained {fyd['epochs']} epochs ({fyd['train_images']} images) with the paper's losses "
        f"and optimiser. CPU: {machine['cpu']}, {machine['cpu_count']} cores, torch {machine['torch']}, load average "
        f"{machine['load_average_start'][0]} at the start, {record['load_average_end'][0]} at the end. "
        f"Command: `python experiments/benchmarks/fyd_bottle.py --epochs {fyd['epochs']}`.",
        "",
        *markdown_table(["", "FYD", "PaDiM"], rows),
        "",
        f"Pipeline limit = min(decode + resize {ref['decode_resize_images_per_second']:.1f} images/s, bare ResNet-18 "
        f"layers 1-3 forward {ref['backbone_images_per_second']:.1f} images/s), measured as in `measure.references` at "
        f"{IMAGE_SIZE} px, batch {BATCH_SIZE}. The bare pipeline (the bare decoding in 2 loader workers feeding the bare "
        f"forward) reaches {ref['bare_pipeline_images_per_second']:.1f} images/s "
        f"({record['bare_pipeline_ratio']:.2f} of the limit): on this machine the workers and the forward share the "
        "same cores, which bounds any pipeline below the limit.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--category-dir", default=str(BOTTLE))
    args = parser.parse_args()
    machine = machine_info()
    common = {"category_dir": args.category_dir, "seed": args.seed, "num_workers": args.num_workers}
    padim = run_task(__file__, "method", method="padim", epochs=args.epochs, **common)
    fyd = run_task(__file__, "method", method="fyd", epochs=args.epochs, **common)
    ref = run_task(HERE / "measure.py", "references", category_dir=args.category_dir, repeats=3,
                   num_workers=args.num_workers, image_size=IMAGE_SIZE, batch_size=BATCH_SIZE)
    limit = min(ref["decode_resize_images_per_second"], ref["backbone_images_per_second"])
    bare_pipeline = ref["bare_pipeline_images_per_second"]
    record = {
        "seed": args.seed,
        "image_size": IMAGE_SIZE,
        "machine": machine,
        "fyd": fyd,
        "padim": padim,
        "references": ref,
        "pipeline_limit_images_per_second": limit,
        "bare_pipeline_ratio": bare_pipeline / limit,
        "fyd_test_ratio": fyd["test_images_per_second"] / limit,
        "padim_test_ratio": padim["test_images_per_second"] / limit,
        "fyd_bare_pipeline_ratio": fyd["test_images_per_second"] / bare_pipeline,
        "padim_bare_pipeline_ratio": padim["test_images_per_second"] / bare_pipeline,
        "fyd_minus_padim_image_auroc": fyd["image_auroc"] - padim["image_auroc"],
        "load_average_end": load_average(),
    }
    write_results("fyd_bottle", record, markdown(record))


if __name__ == "__main__":
    entry_point(TASKS, main)
