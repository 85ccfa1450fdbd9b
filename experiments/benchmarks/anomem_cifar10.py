"""AnoMem against PaDiM on the CIFAR-10 pickles of ../shared/data (cut short: ~460 training normals per
class, 1,017 test images), ResNet-18 from random weights, 32 px, CPU-sized epochs, one run.

    python experiments/benchmarks/anomem_cifar10.py [--classes 0 1 2] [--stage1-epochs 2] [--stage2-epochs 2]

Each measurement runs in its own interpreter (this file re-invoked with `task ...`), so that every peak
resident set size belongs to one run. For each normal class: AnoMem one-class (stage 1, CIFAR stem,
both memory scales, the paper's losses) and PaDiM (ResNet-18 layers 1-3, random init, 100 channels);
then AnoMem semi-supervised with gamma = 0.05, stage 2 alone from the first class's stage-1 checkpoint.
Writes results/anomem_cifar10.json and .md: image AUROC, training images/s, test images/s, peak memory
and the machine's load average (other jobs share the CPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from measure import (
    HERE,
    SHARED_DATA,
    entry_point,
    load_average,
    machine_info,
    markdown_table,
    peak_rss_mb,
    run_task,
    write_results,
)

REPO = HERE.parents[1]
CIFAR = SHARED_DATA / "cifar-10-batches-py"
BATCH_SIZE = 64


def run_method(method: str, root: str, normal_class: int, seed: int, stage1_epochs: int, stage2_epochs: int,
               anomaly_ratio: float = 0.0, stage1_ckpt: str | None = None, save_ckpt: str | None = None) -> dict:
    import hydra
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from anomaly_lab.callbacks import ResultsWriter
    from anomaly_lab.data import CIFAR10DataModule
    from anomaly_lab.evaluation import Evaluator
    from anomaly_lab.models import AnoMem, Padim

    pl.seed_everything(seed, verbose=False)
    views = {}
    if method.startswith("anomem"):  # the augmentations of conf/model/anomem.yaml, as a run gets them
        data_cfg = OmegaConf.load(REPO / "conf" / "model" / "anomem.yaml").data
        data_cfg.image_size = 32
        views = {"train_views": 2, "view_augmentations": hydra.utils.instantiate(data_cfg.view_augmentations)}
    datamodule = CIFAR10DataModule(root, normal_class=normal_class, batch_size=BATCH_SIZE, num_workers=2, seed=seed,
                                   anomaly_ratio=anomaly_ratio, sample_seed=seed, **views)
    if method == "padim":
        model = Padim(backbone="resnet18", backbone_weights=None, n_features=100, seed=seed)
    else:
        model = AnoMem(mode="semi_supervised" if anomaly_ratio else "one_class", backbone="resnet18", stem="cifar",
                       stage1_epochs=stage1_epochs, stage2_epochs=stage2_epochs, stage1_ckpt=stage1_ckpt, seed=seed)
    baseline = peak_rss_mb()
    evaluator = Evaluator()
    scratch = Path(tempfile.mkdtemp())
    writer = ResultsWriter(scratch / "metrics.json", {})
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluator, writer],
                         num_sanity_val_steps=0, **model.trainer_settings)
    train_seconds = 0.0
    if model.needs_training:
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        train_seconds = time.perf_counter() - start - model.fit_normal_seconds
    trainer.validate(model, datamodule=datamodule, verbose=False)
    trainer.test(model, datamodule=datamodule, verbose=False)
    if save_ckpt:
        trainer.save_checkpoint(save_ckpt)
    record = json.loads((scratch / "metrics.json").read_text())
    shutil.rmtree(scratch)
    epochs = model.trainer_settings.get("max_epochs", 0) if model.needs_training else 0
    result = {
        "method": method,
        "normal_class": normal_class,
        "anomaly_ratio": anomaly_ratio,
        "image_auroc": evaluator.results["image_auroc"],
        "train_images": len(datamodule.train_set),
        "epochs": epochs,
        "test_images": len(datamodule.test_set),
        "test_images_per_second": len(datamodule.test_set) / record["scoring_seconds"],
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "load_average": load_average(),
    }
    if epochs:
        result["train_seconds"] = train_seconds
        result["train_images_per_second"] = len(datamodule.train_set) * epochs / train_seconds
    return result


TASKS = {"method": run_method}


def markdown(record: dict) -> str:
    def row(r: dict) -> tuple:
        rate = f"{r['train_images_per_second']:.1f}" if "train_images_per_second" in r else "-"
        return (r["method"], r["normal_class"], r["anomaly_ratio"], r["epochs"], f"{r['image_auroc']:.4f}", rate,
                f"{r['test_images_per_second']:.1f}", f"{r['peak_rss_mb']:.0f}", r["load_average"][0])

    setup = record["setup"]
    lines = [
        "# AnoMem vs PaDiM on CIFAR-10 one-vs-all (../shared/data, cut short)",
        "",
        f"ResNet-18 from random weights (seed {setup['seed']}), 32 px, batch {BATCH_SIZE}; AnoMem with the CIFAR stem, "
        f"memories 512 (layer3, r 0.3) and 256 (layer4, r 1), {setup['stage1_epochs']} stage-1 epochs; semi-supervised "
        f"gamma 0.05: {setup['stage2_epochs']} stage-2 epochs from class {setup['classes'][0]}'s stage-1 checkpoint. "
        f"PaDiM: layers 1-3, 100 random channels. CPU: {record['machine']['cpu']}, "
        f"{record['machine']['cpu_count']} cores, torch threads default. "
        f"Command: `python experiments/benchmarks/anomem_cifar10.py`.",
        "",
        *markdown_table(["method", "normal class", "gamma", "epochs", "image AUROC", "training images/s",
                         "test images/s", "peak RSS (MiB)", "load avg (1 min) at end"], map(row, record["runs"])),
        "",
        f"Mean one-class image AUROC over classes {setup['classes']}: AnoMem {record['anomem_mean_auroc']:.4f}, "
        f"PaDiM {record['padim_mean_auroc']:.4f}. Load average at start {record['machine']['load_average_start']}, at end "
        f"{record['load_average_end']} (2 cores shared with other jobs: rates are indicative).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage1-epochs", type=int, default=2)
    parser.add_argument("--stage2-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=str(CIFAR))
    args = parser.parse_args()
    if not (Path(args.root) / "data_batch_1").is_file():
        sys.exit(f"error: no CIFAR-10 pickles in {args.root} (expected data_batch_1..5 and test_batch)")
    common = {"root": args.root, "seed": args.seed, "stage1_epochs": args.stage1_epochs,
              "stage2_epochs": args.stage2_epochs}
    record = {"setup": {**common, "classes": args.classes}, "machine": machine_info()}
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        ckpt = str(Path(scratch) / "stage1.ckpt")
        for i, normal_class in enumerate(args.classes):
            runs.append(run_task(__file__, "method", method="anomem_one_class", normal_class=normal_class,
                                 save_ckpt=ckpt if i == 0 else None, **common))
            runs.append(run_task(__file__, "method", method="padim", normal_class=normal_class, **common))
        runs.append(run_task(__file__, "method", method="anomem_semi_supervised", normal_class=args.classes[0],
                             anomaly_ratio=0.05, stage1_ckpt=ckpt, **common))
    record["runs"] = runs
    record["load_average_end"] = load_average()
    for method in ("anomem_one_class", "padim"):
        aurocs = [r["image_auroc"] for r in runs if r["method"] == method]
        record[f"{method.split('_')[0]}_mean_auroc"] = sum(aurocs) / len(aurocs)
    write_results("anomem_cifar10", record, markdown(record))


if __name__ == "__main__":
    entry_point(TASKS, main)
