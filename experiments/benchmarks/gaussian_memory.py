"""Memory of the per-position Gaussians (PaDiM, FYD Eq. 6) with all channels against PaDiM's subset:
python experiments/benchmarks/gaussian_memory.py [--size 256] [--measure-images 16]

For ResNet-18 and Wide-ResNet-50-2 (layers 1-3, random initialisation: the shapes are those of the
pretrained nets) at --size px, the channels D and the positions P (layer 1's map) are read from a
forward pass. Per position, `PositionalGaussian` keeps the mean and the inverse covariance in float32,
4 D (D + 1) bytes, and while it fits it sums x and x x^T in float64, 8 D (D + 1) bytes, beside the
float32 inverse it writes: 12 D (D + 1) bytes at the peak of the fit. Then, for ResNet-18, each
setting's Gaussian is fitted on --measure-images random feature maps of that shape in a fresh
interpreter (measure.py) and its peak resident memory reported beside the arithmetic.
Writes experiments/benchmarks/results/gaussian_memory.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time

from measure import entry_point, machine_info, markdown_table, peak_rss_mb, run_task, write_results

SUBSETS = {"resnet18": 100, "wide_resnet50_2": 550}  # PaDiM's channel subsets
LAYERS = ("layer1", "layer2", "layer3")


def shapes(arch: str, size: int) -> tuple[int, int]:
    """(channels of layers 1-3 together, positions of layer 1's map) at `size` px."""
    import torch

    from anomaly_lab.nn.backbones import load_backbone

    net = load_backbone(arch, None).eval()
    x = net.maxpool(net.relu(net.bn1(net.conv1(torch.zeros(1, 3, size, size)))))
    channels, positions = 0, None
    with torch.no_grad():
        for name in LAYERS:
            x = getattr(net, name)(x)
            channels += x.shape[1]
            positions = positions or x.shape[2] * x.shape[3]
    return channels, positions


def fit(dims: int, side: int, n_images: int) -> dict:
    """Fit a PositionalGaussian on random [n, dims, side, side] features in batches of 4."""
    import torch

    from anomaly_lab.nn.gaussian import PositionalGaussian

    torch.manual_seed(0)
    gaussian = PositionalGaussian()
    started = time.perf_counter()
    for _ in range(0, n_images, 4):
        gaussian.update(torch.randn(4, dims, side, side))
    gaussian.finalize()
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--measure-images", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for arch, subset in SUBSETS.items():
        channels, positions = shapes(arch, args.size)
        for dims, setting in ((channels, "all channels (Eq. 6)"), (subset, f"PaDiM's {subset}")):
            per_position = 4 * dims * (dims + 1)
            row = {"backbone": arch, "setting": setting, "dims": dims, "positions": positions,
                   "stored_bytes_per_position": per_position, "stored_gib": per_position * positions / 2**30,
                   "fit_peak_gib": 3 * per_position * positions / 2**30}
            if arch == "resnet18":
                measured = run_task(__file__, "fit", dims=dims, side=int(positions**0.5), n_images=args.measure_images)
                row.update(measured_peak_rss_gib=measured["peak_rss_mb"] / 1024, fit_seconds=measured["seconds"])
            rows.append(row)
            print(row, flush=True)
    table = markdown_table(
        ["backbone", "channels", "D", "bytes per position (stored)", "P", "stored GiB", "fit peak GiB (arithmetic)",
         "fit peak RSS GiB (measured)"],
        [[r["backbone"], r["setting"], r["dims"], f"{r['stored_bytes_per_position']:,}", r["positions"],
          f"{r['stored_gib']:.2f}", f"{r['fit_peak_gib']:.2f}",
          f"{r['measured_peak_rss_gib']:.2f}" if "measured_peak_rss_gib" in r else "-"] for r in rows])
    markdown = "\n".join([f"Per-position Gaussians at {args.size} px, layers 1-3 (`gaussian_memory.py`, "
                          f"{time.strftime('%Y-%m-%d')}); measured: a fit on {args.measure_images} random "
                          "feature maps in a fresh process.", "", *table, ""])
    write_results("gaussian_memory", {"size": args.size, "rows": rows, "machine": machine_info()}, markdown)


if __name__ == "__main__":
    sys.exit(entry_point({"fit": fit}, main))
