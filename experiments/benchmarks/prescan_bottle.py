"""The data pre-scan's cost against a whole PaDiM run on MVTec AD bottle:
python experiments/benchmarks/prescan_bottle.py [--repeats 3]

Each measurement runs in a fresh interpreter (as in measure.py):
- prescan: `scan_samples` over every training, validation and test image and every mask of bottle,
  as `AnomalyDataModule.setup` runs it (headers, file ends, the anomalous images' masks decoded);
  the first pass (files maybe not in the page cache) and the median of `--repeats` more;
- padim: `python train.py model=padim data=mvtec/bottle`, the command a user runs, wall time of the
  whole process (imports, setup with its pre-scan, Gaussian fit, thresholds, test, files).
The goal (issue #16): the pre-scan under 5 % of the PaDiM run.
Writes experiments/benchmarks/results/prescan_bottle.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import BOTTLE, entry_point, machine_info, markdown_table, run_task, write_results

REPOSITORY = Path(__file__).resolve().parents[2]


def prescan(category_dir: str, repeats: int) -> dict:
    from anomaly_lab.data import MVTecDataModule
    from anomaly_lab.data.prescan import scan_samples

    datamodule = MVTecDataModule(Path(category_dir).parent, Path(category_dir).name)
    normals, test = datamodule.find_samples()
    samples = normals + test

    def timed() -> float:
        start = time.perf_counter()
        scan_samples(samples, with_masks=True)
        return time.perf_counter() - start

    first = timed()
    return {"images": len(samples), "masks": sum(s.mask_path is not None for s in samples),
            "first_seconds": first, "median_seconds": statistics.median(timed() for _ in range(repeats))}


def padim(category_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "train.py", "model=padim", "data=mvtec/bottle",
                   f"data.root={Path(category_dir).parent}", f"hydra.run.dir={run_dir}"]
        start = time.perf_counter()
        subprocess.run(command, cwd=REPOSITORY, check=True, capture_output=True)
        return {"wall_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(BOTTLE))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    machine = machine_info()
    scan = run_task(__file__, "prescan", category_dir=args.data_root, repeats=args.repeats)
    run = run_task(__file__, "padim", category_dir=args.data_root)
    worst = max(scan["first_seconds"], scan["median_seconds"])
    record = {"machine": machine, "prescan": scan, "padim": run, "ratio": worst / run["wall_seconds"]}
    rows = [
        ("pre-scan, first pass", scan["images"], f"{scan['first_seconds']:.3f}"),
        (f"pre-scan, median of {args.repeats}", scan["images"], f"{scan['median_seconds']:.3f}"),
        ("`train.py model=padim data=mvtec/bottle`", "", f"{run['wall_seconds']:.1f}"),
    ]
    markdown = "\n".join([
        "# Data pre-scan on MVTec AD bottle",
        "",
        f"{machine['cpu']}, {machine['cpu_count']} cores, load average {machine['load_average_start']}. "
        f"{scan['images']} images, {scan['masks']} masks.",
        "",
        *markdown_table(("what", "images", "seconds"), rows),
        "",
        f"Pre-scan / PaDiM run: **{record['ratio']:.2%}** (goal: under 5 %; the slower pre-scan pass counted).",
        "",
    ])
    write_results("prescan_bottle", record, markdown)


TASKS = {"prescan": prescan, "padim": padim}

if __name__ == "__main__":
    entry_point(TASKS, main)
