"""The Evaluator's peak memory and time on MVTec AD's test set size: 1,725 random 256 x 256 maps and masks.

    python experiments/benchmarks/evaluator_memory.py [--images 1725] [--size 256] [--bits 12 8]

Each measurement runs in its own interpreter (this file re-invoked with `task ...`), so that no run's
memory or caches carry over to another: a Lightning `trainer.test` of a stand-in model (its map is the
batch's image, its image score the map's maximum) over generated batches of 25, with the Evaluator
computing image metrics only (the baseline: generation, loop, image metrics), exact pixel metrics,
and binned pixel metrics for each `--bits`, then the first `--bits` again with glibc's mmap threshold
fixed (see `main`). Memory: the process's peak RSS during the test (VmHWM, reset through
/proc/self/clear_refs just before) minus its RSS before. Time: the whole test, the Evaluator's
per-batch work (summed) and its metrics at the end. Writes results/evaluator_memory.json and .md,
with each binned value's distance to exact and its error bound.

Images: 467 of 1,725 normal (MVTec AD's share, spread over the stream); a map is a smooth random field
plus noise plus a random strength inside the mask; an anomalous image's mask holds 1 to 3 ellipses.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from measure import entry_point, load_average, machine_info, markdown_table, run_task, write_results

MVTEC_TEST_IMAGES, MVTEC_TEST_NORMALS = 1725, 467
BATCH = 25
FIXED_MMAP = ("MALLOC_MMAP_THRESHOLD_", "65536")  # every allocation of 64 KiB or more mapped and unmapped alone


def rss_mb(field: str) -> float:
    """This process's resident set size now (VmRSS) or its peak (VmHWM), in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def generated_sample(index: int, size: int) -> dict:
    """Image `index` of the stream: its map (as the image), its mask and label, the same in every run."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(index)
    coarse = torch.rand(1, 1, size // 16, size // 16, generator=generator)
    field = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    mask = torch.zeros(size, size, dtype=torch.bool)
    anomalous = (index * MVTEC_TEST_NORMALS) % MVTEC_TEST_IMAGES >= MVTEC_TEST_NORMALS
    if anomalous:
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            centre = torch.rand(2, generator=generator) * size
            radii = 3 + torch.rand(2, generator=generator) * size / 8
            mask |= ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1
    strength = 0.2 + 0.8 * torch.rand(1, generator=generator)
    anomaly_map = field + 0.3 * torch.rand(size, size, generator=generator) + strength * mask
    return {"image": anomaly_map[None], "mask": mask[None].float(), "label": int(anomalous), "path": str(index)}


def evaluate(mode: str, images: int, size: int, bits: int | None = None) -> dict:
    """One `trainer.test` over the generated stream with the Evaluator in `mode` (image_only, exact, binned)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, Dataset

    from anomaly_lab.data import Batch
    from anomaly_lab.evaluation import Evaluator

    class Stream(Dataset):
        def __len__(self) -> int:
            return images

        def __getitem__(self, index: int) -> dict:
            return generated_sample(index, size)

    class MapIsImage(pl.LightningModule):
        def test_step(self, batch: Batch, batch_idx: int) -> dict:
            return {"image_score": batch.image.flatten(1).amax(1), "anomaly_map": batch.image}

    class Clock(pl.Callback):
        """Times each batch's end and the epoch's end; placed before and after the Evaluator, the
        differences are the Evaluator's per-batch work and its metrics at the end."""

        def __init__(self) -> None:
            self.batch_ends: list[float] = []

        def on_test_batch_end(self, *args) -> None:
            self.batch_ends.append(time.perf_counter())

        def on_test_epoch_end(self, trainer, pl_module) -> None:
            self.epoch_end = time.perf_counter()

    evaluator = Evaluator(pixel_metrics=mode != "image_only", pixel_histogram_bits=bits)
    before, after = Clock(), Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[before, evaluator, after])
    loader = DataLoader(Stream(), batch_size=BATCH, collate_fn=Batch.collate)
    rss_before = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the RSS now
    start = time.perf_counter()
    trainer.test(MapIsImage(), loader, verbose=False)
    test_seconds = time.perf_counter() - start
    return {"mode": mode, "bits": bits, "images": images, "size": size, "pixels": images * size * size,
            "rss_before_mb": round(rss_before, 1), "peak_rss_delta_mb": round(rss_mb("VmHWM") - rss_before, 1),
            "test_seconds": round(test_seconds, 2),
            "evaluator_batch_seconds": round(sum(a - b for a, b in zip(after.batch_ends, before.batch_ends, strict=True)), 2),
            "metrics_seconds": round(after.epoch_end - after.batch_ends[-1], 2),
            "results": evaluator.results, "record": evaluator.record}


TASKS = {"evaluate": evaluate}


def markdown(record: dict) -> str:
    runs = record["runs"]
    exact = next(r["results"] for r in runs if r["mode"] == "exact")
    setup = record["setup"]
    lines = [
        "# Evaluator: peak memory and time",
        "",
        f"`python experiments/benchmarks/evaluator_memory.py` ({setup['images']:,} generated {setup['size']} x "
        f"{setup['size']} maps and masks, {setup['images'] * setup['size'] ** 2:,} pixels, batches of {BATCH}; "
        f"{record['machine']['cpu']}, load average {record['machine']['load_average_start']} at the start, "
        f"{record['load_average_end']} at the end: other jobs share the cores).",
        "",
        "Memory: peak RSS of the run's process during `trainer.test` minus its RSS just before. Test: the whole "
        "`trainer.test` (generating the maps included); evaluator per batch: the Evaluator's work at each batch's "
        "end, summed; metrics: its computation at the test's end. "
        "|binned - exact|: the largest distance over pixel AUROC, F1 and AUPRO; bound: the largest error "
        "bound the binned run reports (`pixel_error_bounds`). The last run repeats the first binned one with "
        f"`{'='.join(FIXED_MMAP)}`: glibc then returns the holes that per-image temporaries leave in its heap, "
        "so its peak is the Evaluator's own memory; without it the heap grows by those holes (not a leak: "
        "the same run, the same data).",
        "",
    ]
    rows = []
    for run in runs:
        name = run["mode"] if run["bits"] is None else f"binned, {run['bits']} bits"
        if "allocator" in run:
            name += f" ({run['allocator']})"
        pixel = [f"{run['results'][m]:.6f}" if m in run["results"] else "-" for m in
                 ("pixel_auroc", "pixel_f1", "pixel_aupro")]
        distance = bound = "-"
        if run["bits"] is not None:
            distance = f"{max(abs(run['results'][m] - exact[m]) for m in run['record']['pixel_error_bounds']):.1e}"
            bound = f"{max(run['record']['pixel_error_bounds'].values()):.1e}"
        rows.append([name, f"{run['peak_rss_delta_mb']:,.0f}", run["test_seconds"], run["evaluator_batch_seconds"],
                     run["metrics_seconds"],
                     *pixel, distance, bound])
    header = ["evaluator", "peak memory (MiB)", "test (s)", "evaluator per batch (s)", "metrics (s)", "pixel AUROC", "pixel F1",
              "AUPRO", "abs(binned - exact)", "bound"]
    return "\n".join([*lines, *markdown_table(header, rows), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=MVTEC_TEST_IMAGES)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--bits", type=int, nargs="+", default=[12, 8])
    args = parser.parse_args()
    common = {"images": args.images, "size": args.size}
    record = {"setup": {**common, "bits": args.bits}, "machine": machine_info()}
    record["runs"] = [run_task(__file__, "evaluate", mode=mode, **common) for mode in ("image_only", "exact")]
    record["runs"] += [run_task(__file__, "evaluate", mode="binned", bits=bits, **common) for bits in args.bits]
    # glibc's heap keeps the holes that the per-image temporaries leave; with a fixed mmap threshold they go
    # back to the system, so this run shows the binned Evaluator's own memory (and runs slower).
    os.environ[FIXED_MMAP[0]] = FIXED_MMAP[1]
    record["runs"].append({**run_task(__file__, "evaluate", mode="binned", bits=args.bits[0], **common),
                           "allocator": "=".join(FIXED_MMAP)})
    del os.environ[FIXED_MMAP[0]]
    record["load_average_end"] = load_average()
    write_results("evaluator_memory", record, markdown(record))


if __name__ == "__main__":
    entry_point(TASKS, main)
