"""`make bench`: PaDiM (ResNet-18 at random initialisation, 256 px) on MVTec AD bottle, ours against
anomalib 2.7's, with the limits of our test pipeline, all measured in one run.

    python experiments/benchmarks/run.py [--data-root DIR] [--quick] [--skip-peer]

Every measurement runs in a fresh interpreter (measure.py), one after the other, never two at once.
For each seed: the reference figures, our run, anomalib's run; then the Gaussian fit alone with 50
and with 200 training images, each size in three processes. Writes results/padim_bottle.json
(everything) and results/padim_bottle.md (the latest run in full, and one line per run in its history).
README.md says what each figure is and how to read it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from measure import (
    BATCH_SIZE,
    BOTTLE,
    HERE,
    IMAGE_SIZE,
    N_FEATURES,
    RESULTS,
    load_average,
    machine_info,
    run_task,
    write_results,
)

MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

SEEDS = (0, 1, 2)
# Passes over the test images per process (reference figures, our loader + forward), and fresh
# processes per size for the fit alone, whose peak moves by tens of MB from one process to the next.
REPEATS = 3
NUM_WORKERS = 2  # loader workers, for ours, anomalib's and the bare pipeline alike; see README
FIT_SIZES = (50, 200)
PIPELINE_GOAL, TEST_GOAL = 0.9, 0.7  # cached loader + forward, and trainer.test, / the bare backbone forward
AUROC_MARGIN = 0.02  # ours may be at most this much below anomalib's mean image AUROC
FIT_MEMORY_TOLERANCE = 0.1  # the fit's peak increases (over the built model) for 50 and 200 images within 10%
# --quick: one seed, 40 training normals and every 4th test image; fits of one batch and of the 39
# images the fit keeps (its peak depends on the largest batch, so each size holds a full one).
QUICK_TRAIN, QUICK_TEST_STRIDE, QUICK_FIT_SIZES = 40, 4, (BATCH_SIZE, 39)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=BOTTLE,
                        help="the MVTec AD bottle folder (train/good, test/<type>, ground_truth/<type>)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, fewer images")
    parser.add_argument("--skip-peer", action="store_true", help="do not run anomalib's PaDiM")
    args = parser.parse_args()
    category_dir = args.data_root.expanduser().resolve()
    if not (category_dir / "train" / "good").is_dir() or not (category_dir / "test").is_dir():
        print(f"error: no MVTec AD category at {category_dir}: expected train/good/*.png, test/<good|defect>/*.png "
              f"and ground_truth/<defect>/*_mask.png there (pass --data-root; the dataset: {MVTEC_URL})",
              file=sys.stderr)
        sys.exit(1)
    if not args.skip_peer and importlib.util.find_spec("anomalib") is None:
        print("error: anomalib is not installed: `make bench` installs it (the `bench` extra: "
              "pip install -e '.[dev,bench]'), or pass --skip-peer", file=sys.stderr)
        sys.exit(1)

    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        if args.quick:
            category_dir = subset_category(category_dir, Path(scratch) / category_dir.name)
        record = benchmark(category_dir, seeds=SEEDS[:1] if args.quick else SEEDS,
                           fit_sizes=QUICK_FIT_SIZES if args.quick else FIT_SIZES,
                           repeats=1 if args.quick else REPEATS, with_peer=not args.skip_peer)
    record["setup"].update(data_root=str(args.data_root), quick=args.quick)
    record["runtime_seconds"] = round(time.time() - started, 1)
    record["machine"]["load_average_end"] = load_average()

    write_results("padim_bottle", record, render_markdown(record, history(RESULTS / "padim_bottle.md")))


def benchmark(category_dir: Path, seeds: tuple[int, ...], fit_sizes: tuple[int, ...], repeats: int,
              with_peer: bool) -> dict:
    machine = machine_info()
    references, ours, uncached, peer = [], [], [], []
    with tempfile.TemporaryDirectory() as cache_dir:
        cache_build = run_task(HERE / "cache_bottle.py", "build", category_dir=str(category_dir), cache_dir=cache_dir,
                               image_size=IMAGE_SIZE)
        for seed in seeds:
            references.append(measure("references", category_dir=str(category_dir), repeats=repeats, seed=seed,
                                      num_workers=NUM_WORKERS))
            for cache, runs in (("none", uncached), ("disk", ours)):
                runs.append(measure("ours", category_dir=str(category_dir), seed=seed, num_workers=NUM_WORKERS,
                                    repeats=repeats, cache=cache, cache_dir=cache_dir))
            if with_peer:
                peer.append(measure("peer", category_dir=str(category_dir), seed=seed, num_workers=NUM_WORKERS))
    fit_runs = [measure("fit_memory", category_dir=str(category_dir), n_images=n)
                for _ in range(repeats) for n in fit_sizes]
    fits = [{key: statistics.median(r[key] for r in fit_runs if r["train_images"] == n)
             for key in ("train_images", "fit_seconds", "peak_rss_mb", "increase_mb")} for n in fit_sizes]
    machine["torch_threads"] = references[0]["torch_threads"]

    rates = {key: statistics.median(r[key] for r in references) for key in references[0] if key.endswith("_second")}
    limit = min(rates["backbone_images_per_second"], rates["decode_resize_images_per_second"])
    summary, backbone = summarise(ours), rates["backbone_images_per_second"]
    record = {
        "benchmark": "PaDiM, ResNet-18 layers 1-3 at random initialisation, 256 px, 100 channels, MVTec AD bottle",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "setup": {"seeds": list(seeds), "repeats": repeats, "batch_size": BATCH_SIZE,
                  "num_workers": NUM_WORKERS, "image_size": IMAGE_SIZE, "n_features": N_FEATURES,
                  "test_images": ours[0]["test_images"]},
        "ours": summary,  # data.cache=disk, built before (cache_build)
        "ours_uncached": summarise(uncached),
        "cache_build": cache_build,
        "references": {
            **rates,
            "limit_images_per_second": limit,
            "limited_by": "backbone forward" if limit == rates["backbone_images_per_second"] else "decoding + resizing",
            "runs": references,
        },
        # Ours (cached) without the Evaluator, against the bare backbone; then with it; then the bare pipeline.
        "throughput_ratio": summary["pipeline_images_per_second"] / backbone,
        "throughput_ratio_with_metrics": summary["test_images_per_second"] / backbone,
        "model_ratio": summary["model_images_per_second"] / backbone,  # PaDiM's forward on batches in memory
        "bare_pipeline_ratio": rates["bare_pipeline_images_per_second"] / limit,
        "fit_memory": fits,  # medians over the processes of each size
        "fit_memory_runs": fit_runs,
        "peer": summarise(peer) if peer else None,
    }
    record["goals"] = goals(record)
    return record


def measure(task: str, **arguments) -> dict:
    return run_task(HERE / "measure.py", task, **arguments)


def summarise(runs: list[dict]) -> dict:
    """Metrics: mean over seeds; times and rates: median over seeds; peak memory: the highest."""
    summary = {key: statistics.mean(r[key] for r in runs)
               for key in ("image_auroc", "pixel_auroc", "pixel_aupro") if runs[0].get(key) is not None}
    summary.update({key: statistics.median(r[key] for r in runs)
                    for key in ("fit_seconds", "test_images_per_second", "pipeline_images_per_second",
                                "model_images_per_second")
                    if key in runs[0]})
    summary["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    summary["train_images"] = runs[0]["train_images"]
    summary["runs"] = runs
    return summary


def goals(record: dict) -> list[dict]:
    ours, peer, fits = record["ours"], record["peer"], record["fit_memory"]
    small, large = fits[0], fits[-1]
    found = [
        goal(f"test loader + forward (data.cache=disk) >= {PIPELINE_GOAL} x the bare backbone forward",
             f"{record['throughput_ratio']:.2f}", record["throughput_ratio"] >= PIPELINE_GOAL),
        goal(f"trainer.test with every metric (data.cache=disk) >= {TEST_GOAL} x the bare backbone forward",
             f"{record['throughput_ratio_with_metrics']:.2f}", record["throughput_ratio_with_metrics"] >= TEST_GOAL),
        goal(f"Gaussian fit peak memory the same for {small['train_images']} and {large['train_images']} images",
             f"+{small['increase_mb']:.0f} MB / +{large['increase_mb']:.0f} MB",
             abs(large["increase_mb"] - small["increase_mb"]) <= FIT_MEMORY_TOLERANCE * small["increase_mb"]),
    ]
    if peer:
        found += [
            goal(f"image AUROC (mean) no more than {AUROC_MARGIN} below anomalib's",
                 f"{ours['image_auroc']:.3f} vs {peer['image_auroc']:.3f}",
                 ours["image_auroc"] >= peer["image_auroc"] - AUROC_MARGIN),
            goal("test images/s (trainer.test / engine.test) above anomalib's",
                 f"{ours['test_images_per_second']:.1f} vs {peer['test_images_per_second']:.1f}",
                 ours["test_images_per_second"] > peer["test_images_per_second"]),
            goal("peak memory of the whole run below anomalib's",
                 f"{ours['peak_rss_mb']:.0f} MB vs {peer['peak_rss_mb']:.0f} MB", ours["peak_rss_mb"] < peer["peak_rss_mb"]),
        ]
    return found


def goal(name: str, value: str, met: bool) -> dict:
    return {"goal": name, "value": value, "met": bool(met)}


def subset_category(source: Path, target: Path) -> Path:
    """A smaller copy of a category in MVTec layout (for --quick; copies, as anomalib skips symbolic links)."""
    for image in sorted((source / "train" / "good").glob("*.png"))[:QUICK_TRAIN]:
        copy(image, target / "train" / "good" / image.name)
    for index, image in enumerate(sorted(source.glob("test/*/*.png"))):
        if index % QUICK_TEST_STRIDE:
            continue
        defect = image.parent.name
        copy(image, target / "test" / defect / image.name)
        if defect != "good":
            mask = source / "ground_truth" / defect / f"{image.stem}_mask.png"
            copy(mask, target / "ground_truth" / defect / mask.name)
    return target


def copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


# --- Markdown -------------------------------------------------------------------------------------

HISTORY_HEADER = (
    "| date | mode | image AUROC ours / anomalib | test images/s ours / anomalib | limit images/s | ratio "
    "| peak MB ours / anomalib | fit peak MB (small / large) | goals met |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)


def history(markdown: Path) -> list[str]:
    """The history rows of an earlier results file (the table after '## History')."""
    if not markdown.exists():
        return []
    rows = markdown.read_text().split("## History", 1)[-1].splitlines()
    return [row for row in rows if row.startswith("| 2")]  # rows start with the date


def render_markdown(record: dict, earlier_rows: list[str]) -> str:
    ours, peer, ref, setup, machine = (record[k] for k in ("ours", "peer", "references", "setup", "machine"))
    uncached, build = record["ours_uncached"], record["cache_build"]
    seeds = ", ".join(map(str, setup["seeds"]))

    def both(key: str, fmt: str) -> str:
        return f"{ours[key]:{fmt}} | " + (f"{peer[key]:{fmt}}" if peer else "not run")

    lines = [
        "# PaDiM on MVTec AD bottle: anomaly-lab against anomalib",
        "",
        f"Latest run {record['date']}{' (--quick)' if setup['quick'] else ''}: {machine['cpu']}, "
        f"{machine['cpu_count']} CPUs, torch {machine['torch']} with {machine['torch_threads']} threads, anomalib "
        f"{machine['anomalib']}; load average {machine['load_average_start'][0]} at the start, "
        f"{machine['load_average_end'][0]} at the end; {record['runtime_seconds'] / 60:.1f} min. ResNet-18 layers 1-3 "
        f"at random initialisation, 256 x 256, 100 channels, batch size {setup['batch_size']}, "
        f"{setup['num_workers']} loader worker(s) for both, {setup['test_images']} test images, seeds {seeds}. "
        "Written by `make bench`; every number is in `padim_bottle.json`; how to read it: `../README.md`.",
        "",
        "| | anomaly-lab | anomalib 2.7 |",
        "|---|---|---|",
        f"| image AUROC, mean over seeds | {both('image_auroc', '.3f')} |",
        f"| pixel AUROC, mean over seeds | {both('pixel_auroc', '.3f')} |",
        f"| AUPRO (FPR up to 0.3), mean over seeds | {ours['pixel_aupro']:.3f} | not computed |",
        f"| training images | {both('train_images', 'd')} |",
        f"| Gaussian fit (decoding, backbone, sums, inverse), median s | {ours['fit_seconds']:.1f} | |",
        f"| test images/s: `trainer.test` / `engine.test`, metrics included, median over seeds | "
        f"{both('test_images_per_second', '.1f')} |",
        f"| test images/s: test loader + forward only, median over seeds | {ours['pipeline_images_per_second']:.1f} | |",
        f"| test images/s: forward only, on the test batches held in memory, median over seeds | "
        f"{ours['model_images_per_second']:.1f} | |",
        f"| the same without the cache (`data.cache=none`): `trainer.test` / loader + forward | "
        f"{uncached['test_images_per_second']:.1f} / {uncached['pipeline_images_per_second']:.1f} | |",
        f"| peak RSS of the whole run (fit + test), highest, MB | {both('peak_rss_mb', '.0f')} |",
        "",
        f"Limits of our test pipeline, same test images and batch size, median over {len(ref['runs'])} measurement(s): "
        f"bare backbone forward {ref['backbone_images_per_second']:.1f} images/s, bare decoding + resizing "
        f"{ref['decode_resize_images_per_second']:.1f} images/s, so the limit is {ref['limit_images_per_second']:.1f} "
        f"images/s ({ref['limited_by']}). Our runs read the images from a disk cache (`data.cache=disk`, the "
        f"default; built once before them: {build['images']} images in {build['seconds']:.1f} s, "
        f"{build['bytes'] / 2**20:.0f} MiB), so the bare backbone is theirs. **Throughput ratio "
        f"{record['throughput_ratio']:.2f}** of the bare backbone forward (test loader + forward; "
        f"{record['throughput_ratio_with_metrics']:.2f} with `trainer.test` and its metrics; "
        f"{record['model_ratio']:.2f} for PaDiM's forward alone on batches in memory, its ceiling: the backbone plus "
        "the channel selection, the Mahalanobis distances, the resizing and the blur). For scale, "
        f"the bare pipeline (the bare decoding in {setup['num_workers']} loader workers feeding the bare backbone, "
        f"the two sharing the CPUs) reaches {ref['bare_pipeline_images_per_second']:.1f} images/s, "
        f"{record['bare_pipeline_ratio']:.2f} of the limit.",
        "",
        f"Gaussian fit alone, medians over {setup['repeats']} fresh process(es) per size: "
        + "; ".join(f"{f['train_images']} images: peak {f['peak_rss_mb']:.0f} MB, +{f['increase_mb']:.0f} MB over the "
                    f"constructed model, {f['fit_seconds']:.1f} s" for f in record["fit_memory"]) + ".",
        "",
        "| goal | value | met |",
        "|---|---|---|",
        *(f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else '**no**'} |" for g in record["goals"]),
        "",
        "## History",
        "",
        HISTORY_HEADER.rstrip("\n"),
        *earlier_rows,
        history_row(record),
        "",
    ]
    return "\n".join(lines)


def history_row(record: dict) -> str:
    ours, peer, fits = record["ours"], record["peer"], record["fit_memory"]
    met = sum(g["met"] for g in record["goals"])

    def pair(key: str, fmt: str) -> str:
        return f"{ours[key]:{fmt}} / " + (f"{peer[key]:{fmt}}" if peer else "-")

    return (
        f"| {record['date']} | {'quick' if record['setup']['quick'] else 'full'} | {pair('image_auroc', '.3f')} "
        f"| {pair('test_images_per_second', '.1f')} | {record['references']['limit_images_per_second']:.1f} "
        f"| {record['throughput_ratio']:.2f} | {pair('peak_rss_mb', '.0f')} "
        f"| {fits[0]['peak_rss_mb']:.0f} / {fits[-1]['peak_rss_mb']:.0f} | {met} of {len(record['goals'])} |"
    )


if __name__ == "__main__":
    main()
