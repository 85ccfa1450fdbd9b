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
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BOTTLE = REPO.parent / "shared" / "data" / "mvtec" / "bottle"
IMAGE_SIZE = 224
BATCH_SIZE = 32


def run_method(method: str, category_dir: str, seed: int, epochs: int, num_workers: int) -> dict:
    import pytorch_lightning as pl
    from measure import peak_rss_mb

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
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule)
    test_seconds = time.perf_counter() - start
    scoring_seconds = json.loads((scratch / "metrics.json").read_text())["scoring_seconds"]
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
        "test_seconds": test_seconds,  # the whole test stage, with the metrics computed at its end
        "scoring_seconds": scoring_seconds,
        "test_images_per_second": len(datamodule.test_set) / scoring_seconds,
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
    import statistics

    import torch
    from torchvision.models import resnet18

    images = next(iter(datamodule.test_dataloader())).image
    net = resnet18().eval()

    def bare() -> None:
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        net.layer3(net.layer2(net.layer1(x)))

    model.eval()
    seconds = {"model": [], "bare": []}
    with torch.inference_mode():
        bare(), model(images)  # warm-up
        for _ in range(repeats):
            for name, run in (("model", lambda: model(images)), ("bare", bare)):
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    model_rate = len(images) / statistics.median(seconds["model"])
    bare_rate = len(images) / statistics.median(seconds["bare"])
    return {"forward_images_per_second": model_rate, "bare_backbone_images_per_second": bare_rate,
            "forward_over_bare_backbone": model_rate / bare_rate}


def references(category_dir: str, repeats: int) -> dict:
    import measure

    measure.IMAGE_SIZE = IMAGE_SIZE
    return measure.references(category_dir, repeats)


def task_main(name: str, arguments: str, result_path: str) -> None:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    import measure

    measure.quiet()
    tasks = {"method": run_method, "references": references}
    Path(result_path).write_text(json.dumps(tasks[name](**json.loads(arguments)), indent=2))


def spawn(name: str, **arguments) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        out = Path(workdir) / "result.json"
        subprocess.run([sys.executable, __file__, "task", name, json.dumps(arguments), str(out)], check=True, cwd=REPO)
        return json.loads(out.read_text())


def markdown(record: dict) -> str:
    fyd, padim, ref = record["fyd"], record["padim"], record["references"]
    rows = [
        ("image AUROC", f"{fyd['image_auroc']:.4f}", f"{padim['image_auroc']:.4f}"),
        ("pixel AUROC", f"{fyd['pixel_auroc']:.4f}", f"{padim['pixel_auroc']:.4f}"),
        ("pixel AUPRO (FPR 0.3)", f"{fyd['pixel_aupro']:.4f}", f"{padim['pixel_aupro']:.4f}"),
        ("training images/s", f"{fyd['train_images_per_second']:.2f}", "- (no training)"),
        ("test images/s (scoring: decode to map, as metrics.json)", f"{fyd['test_images_per_second']:.2f}",
         f"{padim['test_images_per_second']:.2f}"),
        ("whole test stage, s (+ exact metrics at the end)", f"{fyd['test_seconds']:.1f}", f"{padim['test_seconds']:.1f}"),
        ("test images/s / pipeline limit", f"{record['fyd_test_ratio']:.2f}", f"{record['padim_test_ratio']:.2f}"),
        ("scoring forward / bare backbone forward (same batch, same process)",
         f"{fyd['forward_over_bare_backbone']:.2f}", f"{padim['forward_over_bare_backbone']:.2f}"),
        ("peak RSS (MiB)", f"{fyd['peak_rss_mb']:.0f}", f"{padim['peak_rss_mb']:.0f}"),
    ]
    lines = [
        "# FYD vs PaDiM on MVTec AD bottle",
        "",
        f"Random-init ResNet-18 (same seed {record['seed']}) for both, {IMAGE_SIZE} x {IMAGE_SIZE}, batch {BATCH_SIZE}, "
        f"FYD trained {fyd['epochs']} epochs ({fyd['train_images']} images) with the paper's losses and optimiser; "
        f"CPU: {record['machine']}. Command: `python experiments/benchmarks/fyd_bottle.py --epochs {fyd['epochs']}`.",
        "",
        "| | FYD | PaDiM |",
        "|---|---|---|",
        *[f"| {name} | {a} | {b} |" for name, a, b in rows],
        "",
        f"Pipeline limit = min(decode + resize {ref['decode_resize_images_per_second']:.1f} images/s, bare ResNet-18 "
        f"layers 1-3 forward {ref['backbone_images_per_second']:.1f} images/s), measured as in `measure.references` at "
        f"{IMAGE_SIZE} px.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--category-dir", default=str(BOTTLE))
    args = parser.parse_args()
    common = {"category_dir": args.category_dir, "seed": args.seed, "num_workers": args.num_workers}
    padim = spawn("method", method="padim", epochs=args.epochs, **common)
    fyd = spawn("method", method="fyd", epochs=args.epochs, **common)
    ref = spawn("references", category_dir=args.category_dir, repeats=3)
    limit = min(ref["decode_resize_images_per_second"], ref["backbone_images_per_second"])
    record = {
        "seed": args.seed,
        "image_size": IMAGE_SIZE,
        "machine": f"{platform.processor() or platform.machine()}, torch threads default",
        "fyd": fyd,
        "padim": padim,
        "references": ref,
        "pipeline_limit_images_per_second": limit,
        "fyd_test_ratio": fyd["test_images_per_second"] / limit,
        "padim_test_ratio": padim["test_images_per_second"] / limit,
        "fyd_minus_padim_image_auroc": fyd["image_auroc"] - padim["image_auroc"],
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "fyd_bottle.json").write_text(json.dumps(record, indent=2))
    (out / "fyd_bottle.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "task":
        task_main(*sys.argv[2:5])
    else:
        main()
