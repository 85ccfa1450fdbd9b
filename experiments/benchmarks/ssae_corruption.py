"""SSAE's training corruption, batched on tensors against the per-image NumPy reference:
python experiments/benchmarks/ssae_corruption.py [--sizes 128 256] [--batch 8]

Each measurement runs in a fresh interpreter (peak memory per task, as in measure.py), on the training
normals of MVTec AD bottle resized to each size (random images if the folder is absent), with the
model config's corruption (elastic alpha 0.2, sigma 0.02 of the side; the reference gets the same
values in pixels):
- tensor: `PatchCorruption` (corruption.py) on batches of --batch images, on the CPU;
- reference: `ReferencePatchCorruption` (corruption_reference.py, albumentations' ElasticTransform and
  OpenCV, one image at a time), on the same batches.
Both report images/s, the peak memory, and the statistics a test also compares: the corrupted
fraction of the image and the mean displacement of corrupted pixels (measured on coordinate ramps).
Writes experiments/benchmarks/results/ssae_corruption.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from measure import BOTTLE, entry_point, machine_info, markdown_table, peak_rss_mb, run_task, write_results

REPO = Path(__file__).resolve().parents[2]
ALPHA, SIGMA = 0.2, 0.02
STATISTICS_IMAGES = 200


def load_images(size: int):
    import numpy as np
    import torch
    from PIL import Image

    paths = sorted((BOTTLE / "train" / "good").glob("*.png"))
    if not paths:
        return torch.rand(64, 3, size, size, generator=torch.Generator().manual_seed(0)), "random"
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255, "bottle"


def make(kind: str, size: int, seed: int = 0):
    sys.path.insert(0, str(REPO))
    from anomaly_lab.models.ssae.corruption import PatchCorruption, elastic_pixels
    from anomaly_lab.models.ssae.corruption_reference import ReferencePatchCorruption

    if kind == "tensor":
        return PatchCorruption(elastic_alpha=ALPHA, elastic_sigma=SIGMA, seed=seed)
    alpha_px, sigma_px = elastic_pixels(size, ALPHA, SIGMA)
    return ReferencePatchCorruption(elastic_alpha=alpha_px, elastic_sigma=sigma_px, seed=seed)


def corruption_statistics(corruption, size: int) -> dict:
    """Corrupted fraction and displacement (px) of corrupted pixels, on coordinate ramps (x, y, 0.5)."""
    import torch

    coordinates = torch.arange(size) / (size - 1)
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    ramps = torch.stack([x, y, torch.full_like(x, 0.5)]).expand(STATISTICS_IMAGES, -1, -1, -1).contiguous()
    corrupted, mask = corruption(ramps)
    shift = ((corrupted - ramps)[:, :2].abs() * (size - 1))[mask.bool().expand(-1, 2, -1, -1)]
    return {"corrupted_fraction": mask.mean().item(), "mean_shift_px": shift.mean().item(),
            "p90_shift_px": shift.quantile(0.9).item()}


def measure(kind: str, size: int, batch: int, repeats: int) -> dict:
    images, source = load_images(size)
    corruption = make(kind, size)
    batches = list(images.split(batch))
    corruption(batches[0])  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        for chunk in batches:
            corruption(chunk)
    seconds = time.perf_counter() - started
    return {"kind": kind, "size": size, "batch": batch, "source": source, "images": len(images) * repeats,
            "images_per_second": len(images) * repeats / seconds, "peak_rss_mb": peak_rss_mb(),
            **corruption_statistics(make(kind, size), size)}


TASKS = {"measure": measure}


def markdown(record: dict) -> str:
    lines = ["# SSAE corruption: batched tensors against the per-image NumPy reference (CPU)", "",
             f"Measured {record['date']} on {record['machine']['cpu_count']} cores ({record['machine']['cpu']}, load "
             f"average {record['machine']['load_average_start'][0]} at the start); images: {record['rows'][0]['source']}, "
             f"batches of {record['rows'][0]['batch']}. Statistics on {STATISTICS_IMAGES} coordinate ramps.", ""]
    rows = []
    for size in sorted({row["size"] for row in record["rows"]}):
        tensor, reference = (next(r for r in record["rows"] if r["size"] == size and r["kind"] == k)
                             for k in ("tensor", "reference"))
        for row in (tensor, reference):
            rows.append((size, row["kind"], f"{row['images_per_second']:.0f}",
                         f"{row['images_per_second'] / reference['images_per_second']:.2f}", f"{row['peak_rss_mb']:.0f}",
                         f"{row['corrupted_fraction']:.4f}", f"{row['mean_shift_px']:.2f}", f"{row['p90_shift_px']:.2f}"))
    lines += markdown_table(["size", "path", "images/s", "x reference", "peak MiB", "corrupted fraction",
                             "mean shift px", "p90 shift px"], rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(), "rows": [
        run_task(__file__, "measure", kind=kind, size=size, batch=args.batch, repeats=args.repeats)
        for size in args.sizes for kind in ("tensor", "reference")]}
    write_results("ssae_corruption", record, markdown(record))


if __name__ == "__main__":
    entry_point(TASKS, main)
