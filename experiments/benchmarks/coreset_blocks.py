"""How the block size of PatchCore's exact lazy greedy selection sets its speed, on real features:
python experiments/benchmarks/coreset_blocks.py [--data-root DIR] [--steps N]

The patch features of MVTec AD bottle's training normals (ResNet-18 layers 2-3 at random
initialisation, 256 px, projected to 128 dimensions as `model=patchcore` does), then the first
`--steps` steps of greedy k-center (all 10 % by default) for each block size, each in a fresh process
(measure.py). `None` is the plain loop, one pass over every point per step; it runs `--plain-steps`
steps only and its time is given per step. Every block size must select the plain loop's indices.
Writes results/coreset_blocks.json and .md; the default `model.coreset_block_size` is the fastest here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from measure import (
    BATCH_SIZE,
    BOTTLE,
    IMAGE_SIZE,
    entry_point,
    machine_info,
    markdown_table,
    run_task,
    write_results,
)

BLOCK_SIZES = (256, 1024, 4096, 16384)


def features(category_dir: str, path: str) -> dict:
    """The projected bank of bottle's training normals, saved to `path`, as `Patchcore.fit_normal` builds it."""
    import torch

    from anomaly_lab.data import MVTecDataModule
    from anomaly_lab.models import Patchcore

    category_dir = Path(category_dir)
    datamodule = MVTecDataModule(category_dir.parent, category_dir.name, image_size=IMAGE_SIZE, batch_size=BATCH_SIZE)
    datamodule.setup("fit")
    model = Patchcore(backbone="resnet18", backbone_weights=None).eval()
    start = time.perf_counter()
    with torch.no_grad():
        bank = model._embed_all(datamodule.normal_dataloader()).flatten(0, 1)
        projected = model._project(bank, torch.Generator().manual_seed(0))
    torch.save(projected, path)
    return {"points": len(projected), "dims": projected.shape[1], "seconds": time.perf_counter() - start}


def select(path: str, steps: int, block_size: int | None) -> dict:
    import torch

    from anomaly_lab.nn.coreset import greedy_coreset

    points = torch.load(path)
    start = time.perf_counter()
    indices = greedy_coreset(points, steps, start=0, block_size=block_size)
    seconds = time.perf_counter() - start
    return {"block_size": block_size, "steps": steps, "seconds": seconds, "ms_per_step": 1000 * seconds / steps,
            "indices": indices.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=BOTTLE)
    parser.add_argument("--steps", type=int, default=None, help="greedy steps (default: 10 %% of the points)")
    parser.add_argument("--plain-steps", type=int, default=1000)
    args = parser.parse_args()
    machine = machine_info()
    with tempfile.TemporaryDirectory() as scratch:
        bank = str(Path(scratch) / "bank.pt")
        built = run_task(__file__, "features", category_dir=str(args.data_root), path=bank)
        steps = args.steps or built["points"] // 10
        plain = run_task(__file__, "select", path=bank, steps=args.plain_steps, block_size=None)
        blocked = [run_task(__file__, "select", path=bank, steps=steps, block_size=b) for b in BLOCK_SIZES]
    for run in blocked:
        run["same_indices_as_plain"] = run["indices"][: args.plain_steps] == plain["indices"]
    for run in (plain, *blocked):
        del run["indices"]
    record = {"machine": machine, "bank": built, "plain": plain, "blocked": blocked,
              "plain_seconds_extrapolated": plain["ms_per_step"] * steps / 1000}
    rows = [["none (plain loop)", plain["steps"], f"{plain['ms_per_step']:.1f}",
             f"{record['plain_seconds_extrapolated']:.0f} (extrapolated)", "-"]]
    rows += [[r["block_size"], r["steps"], f"{r['ms_per_step']:.2f}", f"{r['seconds']:.1f}",
              "yes" if r["same_indices_as_plain"] else "**no**"] for r in blocked]
    markdown = "\n".join([
        "# Greedy k-center on bottle's patch features: block size against speed",
        "",
        f"{machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['torch']}. {built['points']} patch features of "
        f"bottle's training normals (ResNet-18 layers 2-3, random initialisation, {IMAGE_SIZE} px), projected to "
        f"{built['dims']} dimensions; {steps} greedy steps (10 %). Written by `experiments/benchmarks/coreset_blocks.py`.",
        "",
        *markdown_table(["block size", "steps", "ms per step", "seconds", f"first {plain['steps']} indices = plain"],
                        rows),
        "",
    ])
    write_results("coreset_blocks", record, markdown)


if __name__ == "__main__":
    entry_point({"features": features, "select": select}, main)
