"""PatchCore on MVTec AD bottle, ours against anomalib 2.7's, in one run (part of `make bench`).

    python experiments/benchmarks/patchcore_bottle.py [--data-root DIR] [--quick] [--seeds 0 1 2]
                                                      [--peer-seeds 0] [--skip-peer]

Both: ResNet-18 layers 2 and 3 at random initialisation (no weights offline), the same weights on
both sides (torchvision's draw for the seed, loaded into anomalib's timm extractor), 256 x 256, every
training normal in the bank, coreset ratio 0.1, 9 neighbours for the re-weighting, batch size 16, the
same loader workers. Each run is a
fresh interpreter (measure.py: peak memory per run), one at a time:
- ours: our datamodule, Trainer and Evaluator: validate (memory bank + coreset, then thresholds),
  then test, timed; the coreset selection timed on its own;
- peer: anomalib's MVTecAD datamodule, Patchcore and Engine: fit (memory bank + coreset), then test,
  timed; its KCenterGreedy selection timed on its own.
anomalib's selection takes about an hour on 2 cores, so it runs for `--peer-seeds` (default: seed 0
only) and ours for every seed of `--seeds`; means over each one's seeds. Writes
results/patchcore_bottle.json (every figure) and results/patchcore_bottle.md (with --quick:
patchcore_bottle_quick.*).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from measure import (
    BATCH_SIZE,
    BOTTLE,
    IMAGE_SIZE,
    anomalib_fit_and_test,
    anomalib_mvtec,
    entry_point,
    load_average,
    machine_info,
    markdown_table,
    peak_rss_mb,
    run_task,
    write_results,
)
from run import subset_category

HERE = Path(__file__).resolve().parent
CORESET_RATIO, NEIGHBOURS, NUM_WORKERS = 0.1, 9, 2
CORESET_SPEEDUP, TEST_SPEEDUP, AUROC_MARGIN = 20.0, 3.0, 0.02  # the goals of issue #23


class Stopwatch:
    """Wraps `owner.name` (a function or method) so that the seconds spent in it add up in `seconds`."""

    def __init__(self, owner, name: str):
        self.seconds, self.calls, original = 0.0, 0, getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        setattr(owner, name, timed)


def ours(category_dir: str, seed: int, num_workers: int) -> dict:
    import pytorch_lightning as pl
    import torch

    import anomaly_lab.models.patchcore as patchcore
    from anomaly_lab.data import MVTecDataModule
    from anomaly_lab.evaluation import Evaluator

    category_dir = Path(category_dir)
    pl.seed_everything(seed, verbose=False)
    coreset = Stopwatch(patchcore, "greedy_coreset")
    # val_ratio=0: every training normal goes into the bank, as in anomalib (thresholds then come from
    # the training normals; the AUROCs do not use them).
    datamodule = MVTecDataModule(category_dir.parent, category_dir.name, image_size=IMAGE_SIZE, val_ratio=0,
                                 batch_size=BATCH_SIZE, num_workers=num_workers, seed=seed, cache="none")
    torch.manual_seed(seed)  # the backbone's random weights: the same draw as the peer's (backbone_weights)
    model = patchcore.Patchcore(backbone="resnet18", backbone_weights=None, coreset_ratio=CORESET_RATIO,
                                num_neighbors=NEIGHBOURS, seed=seed)
    evaluator = Evaluator()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluator])
    trainer.validate(model, datamodule=datamodule, verbose=False)  # memory bank, coreset, thresholds
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    test_images = len(datamodule.test_set)
    return {
        "seed": seed,
        "image_auroc": evaluator.results["image_auroc"],
        "pixel_auroc": evaluator.results["pixel_auroc"],
        "pixel_aupro": evaluator.results["pixel_aupro"],
        "train_images": len(datamodule.normal_set),
        "backbone_checksum": checksum(model.extractor.state_dict()),
        "bank_size": len(model.memory_bank),
        "fit_seconds": model.fit_normal_seconds,
        "coreset_seconds": coreset.seconds,
        "test_images": test_images,
        "test_images_per_second": test_images / test_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def peer(category_dir: str, seed: int, num_workers: int) -> dict:
    import torch
    from anomalib.models import Patchcore
    from anomalib.models.components.sampling import KCenterGreedy
    from torchvision.models import resnet18

    datamodule = anomalib_mvtec(category_dir, seed, num_workers)
    coreset = Stopwatch(KCenterGreedy, "sample_coreset")
    # anomalib's default pre-processor resizes to 256 x 256, as ours; no visualizer on either side.
    model = Patchcore(backbone="resnet18", pre_trained=False, layers=("layer2", "layer3"),
                      coreset_sampling_ratio=CORESET_RATIO, num_neighbors=NEIGHBOURS, visualizer=False)
    # timm's random initialisation is not torchvision's (it zeroes each block's last batch-norm scale):
    # give anomalib's extractor the weights ours draws, so that the two differ only in what follows it.
    torch.manual_seed(seed)
    extractor = model.model.feature_extractor.feature_extractor
    missing, unexpected = extractor.load_state_dict(resnet18().state_dict(), strict=False)
    if missing or any(not key.startswith(("fc.", "layer4.")) for key in unexpected):
        raise RuntimeError(f"torchvision's ResNet-18 does not fit anomalib's extractor: {missing} {unexpected}")
    results, fit_seconds, test_seconds = anomalib_fit_and_test(model, datamodule)
    test_images = len(datamodule.test_data)
    return {
        "seed": seed,
        "image_auroc": results["image_AUROC"],
        "pixel_auroc": results.get("pixel_AUROC"),
        "train_images": len(datamodule.train_data),
        "backbone_checksum": checksum(extractor.state_dict()),
        "bank_size": len(model.model.memory_bank),
        "fit_seconds": fit_seconds,
        "coreset_seconds": coreset.seconds,
        "test_images": test_images,
        "test_images_per_second": test_images / test_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def checksum(state: dict) -> float:
    """The sum of every weight of conv1 to layer 3 (ours are prefixed `body.`): equal when the backbones are."""
    return float(sum(value.double().sum() for key, value in state.items()
                     if key.endswith("weight") and not key.removeprefix("body.").startswith(("fc.", "layer4."))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=BOTTLE, help="the MVTec AD bottle folder")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0, 40 training normals, 1/4 of the test")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--peer-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--skip-peer", action="store_true", help="do not run anomalib's PatchCore")
    args = parser.parse_args()
    category_dir = args.data_root.expanduser().resolve()
    if not (category_dir / "train" / "good").is_dir():
        sys.exit(f"error: no MVTec AD category at {category_dir} (expected train/good/*.png; pass --data-root)")
    if not args.skip_peer and importlib.util.find_spec("anomalib") is None:
        sys.exit("error: anomalib is not installed: `make bench` installs it (pip install -e '.[dev,bench]'), "
                 "or pass --skip-peer")
    seeds, peer_seeds = ([0], [0]) if args.quick else (args.seeds, args.peer_seeds)
    started, machine = time.time(), machine_info()
    with tempfile.TemporaryDirectory() as scratch:
        if args.quick:
            category_dir = subset_category(category_dir, Path(scratch) / category_dir.name)
        arguments = {"category_dir": str(category_dir), "num_workers": NUM_WORKERS}
        # anomalib first: its hour-long run fails, if at all, before ours are spent.
        runs = {"peer": [] if args.skip_peer else [logged(run_task(__file__, "peer", seed=s, **arguments))
                                                   for s in peer_seeds],
                "ours": [logged(run_task(__file__, "ours", seed=s, **arguments)) for s in seeds]}
    machine["load_average_end"] = load_average()
    record = {
        "benchmark": "PatchCore, ResNet-18 layers 2-3 at random initialisation, 256 px, coreset ratio 0.1, "
                     "MVTec AD bottle",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "setup": {"data_root": str(args.data_root), "quick": args.quick, "seeds": seeds,
                  "peer_seeds": [] if args.skip_peer else peer_seeds, "batch_size": BATCH_SIZE,
                  "num_workers": NUM_WORKERS, "image_size": IMAGE_SIZE, "coreset_ratio": CORESET_RATIO,
                  "num_neighbors": NEIGHBOURS},
        "runtime_seconds": round(time.time() - started, 1),
        "ours": summarise(runs["ours"]),
        "peer": summarise(runs["peer"]) if runs["peer"] else None,
    }
    record["goals"] = goals(record["ours"], record["peer"])
    name = "patchcore_bottle_quick" if args.quick else "patchcore_bottle"
    write_results(name, record, render_markdown(record, name))


def logged(run: dict) -> dict:
    print(json.dumps(run), flush=True)  # each run's figures as soon as it ends
    return run


def summarise(runs: list[dict]) -> dict:
    """Metrics: mean over seeds; times and rates: median; peak memory: the highest."""
    summary = {key: statistics.mean(r[key] for r in runs) for key in ("image_auroc", "pixel_auroc", "pixel_aupro")
               if runs[0].get(key) is not None}
    summary.update({key: statistics.median(r[key] for r in runs)
                    for key in ("fit_seconds", "coreset_seconds", "test_images_per_second")})
    summary.update(peak_rss_mb=max(r["peak_rss_mb"] for r in runs), train_images=runs[0]["train_images"], backbone_checksum=runs[0]["backbone_checksum"],
                   bank_size=runs[0]["bank_size"], runs=runs)
    return summary


def goals(ours: dict, peer: dict | None) -> list[dict]:
    if peer is None:
        return []
    coreset, test = peer["coreset_seconds"] / ours["coreset_seconds"], ours["test_images_per_second"] / peer[
        "test_images_per_second"]
    return [
        {"goal": f"coreset selection >= {CORESET_SPEEDUP:.0f}x faster than anomalib's", "value": f"{coreset:.1f}x",
         "met": coreset >= CORESET_SPEEDUP},
        {"goal": f"test images/s >= {TEST_SPEEDUP:.0f}x anomalib's", "value": f"{test:.1f}x", "met": test >= TEST_SPEEDUP},
        {"goal": "peak memory below anomalib's", "value": f"{ours['peak_rss_mb']:.0f} vs {peer['peak_rss_mb']:.0f} MB",
         "met": ours["peak_rss_mb"] < peer["peak_rss_mb"]},
        *({"goal": f"{name} AUROC within {AUROC_MARGIN} of anomalib's",
           "value": f"{ours[key]:.3f} vs {peer[key]:.3f}", "met": abs(ours[key] - peer[key]) <= AUROC_MARGIN}
          for name, key in (("image", "image_auroc"), ("pixel", "pixel_auroc"))),
    ]


def render_markdown(record: dict, name: str) -> str:
    ours, peer, setup, machine = record["ours"], record["peer"], record["setup"], record["machine"]

    def row(label: str, key: str, fmt: str) -> list[str]:
        return [label, f"{ours[key]:{fmt}}", f"{peer[key]:{fmt}}" if peer and peer.get(key) is not None else "-"]

    lines = [
        "# PatchCore on MVTec AD bottle: anomaly-lab against anomalib",
        "",
        f"Run {record['date']}{' (--quick)' if setup['quick'] else ''}: {machine['cpu']}, {machine['cpu_count']} CPUs, "
        f"torch {machine['torch']}, anomalib {machine['anomalib']}; load average {machine['load_average_start'][0]} "
        f"at the start, {machine['load_average_end'][0]} at the end; {record['runtime_seconds'] / 60:.1f} min. "
        f"ResNet-18 layers 2-3 at random initialisation, {setup['image_size']} x {setup['image_size']}, coreset ratio "
        f"{setup['coreset_ratio']}, {setup['num_neighbors']} neighbours, batch size {setup['batch_size']}, "
        f"{setup['num_workers']} loader workers for both. Ours: seeds {setup['seeds']}; anomalib: seeds "
        f"{setup['peer_seeds'] or 'not run'}. Written by `experiments/benchmarks/patchcore_bottle.py`; every number "
        f"is in `{name}.json`.",
        "",
        *markdown_table(["", "anomaly-lab", "anomalib"], [
            row("image AUROC, mean over seeds", "image_auroc", ".3f"),
            row("pixel AUROC, mean over seeds", "pixel_auroc", ".3f"),
            [*row("AUPRO (FPR up to 0.3), mean over seeds", "pixel_aupro", ".3f")[:2], "not computed"],
            row("training images", "train_images", "d"),
            row("backbone checksum, first seed (equal: the same random weights)", "backbone_checksum", ".4f"),
            row("memory bank after the coreset (patches)", "bank_size", "d"),
            row("fit: features + coreset (+ neighbourhoods, ours), median s", "fit_seconds", ".1f"),
            row("coreset selection alone, median s", "coreset_seconds", ".1f"),
            row("test images/s (`trainer.test` / `engine.test`, metrics included), median", "test_images_per_second", ".2f"),
            row("peak RSS of the whole run, highest, MB", "peak_rss_mb", ".0f"),
        ]),
        "",
        *markdown_table(["goal", "value", "met"], [[g["goal"], g["value"], "yes" if g["met"] else "**no**"]
                                                  for g in record["goals"]]),
        "",
    ]
    return "\n".join(lines)


TASKS = {"ours": ours, "peer": peer}

if __name__ == "__main__":
    entry_point(TASKS, main)
