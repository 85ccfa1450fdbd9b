"""FYD's components on MVTec AD bottle (../shared/data), spatially disturbed and plain, on 2 CPU cores.

    python experiments/fyd_disturbed_spatial/bottle.py run [--rows ...] [--seeds 0 1]
    python experiments/fyd_disturbed_spatial/bottle.py report

run: one `train.py` run per row and seed, one at a time; each writes results/<row>_s<seed>.json as it
finishes (a later call skips what is done). Disturbed rows: `experiment=fyd_disturbed_spatial` (random
zoom 0.8-1.2, rotation up to 45 degrees, horizontal and vertical flips of training and test images and
masks, one fixed draw per image from data.seed), with the model config's CPU budget (10 epochs,
224 px) and a randomly initialised ResNet-18 (no pretrained weights here). Plain rows: `model=fyd
data=mvtec/bottle` with the same budget. Components: full (ICA, FCA after layers 1-3, dense
non-contrastive learning), no_ica, no_fca, no_non_contrastive (ICA alone: FCA is trained only by the
non-contrastive loss, so it goes too) and padim (everything off: PaDiM on the same backbone and all
448 channels, nothing trained). No setting is chosen here: every row runs the model config's
defaults, so no test image steers anything.

report: the README block between the markers and bars.png from the JSON files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO))
from experiments.commands import run  # noqa: E402

DATA_ROOT = REPO.parent / "shared" / "data"
DISTURBED = ["experiment=fyd_disturbed_spatial", "data=mvtec/bottle", "model.backbone_weights=null",
             "trainer.max_epochs=10"]
PLAIN = ["model=fyd", "data=mvtec/bottle"]
ALL_FCA = "model.fca_layers=[layer1,layer2,layer3]"
COMPONENTS = {
    "full": ["model.ica=true", ALL_FCA, "model.non_contrastive=true"],
    "no_ica": ["model.ica=false", ALL_FCA, "model.non_contrastive=true"],
    "no_fca": ["model.ica=true", "model.fca_layers=[]", "model.non_contrastive=true"],
    "no_non_contrastive": ["model.ica=true", "model.fca_layers=[]", "model.non_contrastive=false"],
    "padim": ["model.ica=false", "model.fca_layers=[]", "model.non_contrastive=false"],
}
ROWS = {f"disturbed_{name}": [*DISTURBED, *overrides] for name, overrides in COMPONENTS.items()}
ROWS |= {f"plain_{name}": [*PLAIN, *COMPONENTS[name]] for name in ("full", "padim")}
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
README_BEGIN, README_END = "<!-- bottle.py: begin -->", "<!-- bottle.py: end -->"


def run_rows(args) -> None:
    for seed in args.seeds:
        for name in args.rows:
            result = RESULTS / f"{name}_s{seed}.json"
            if result.exists():
                continue
            run_dir = args.runs / f"{name}_s{seed}"
            seconds = run("train.py", [*ROWS[name], f"seed={seed}"], run_dir, args.data_root)
            record = json.loads((run_dir / "metrics.json").read_text())
            RESULTS.mkdir(exist_ok=True)
            result.write_text(json.dumps({
                "row": name, "seed": seed, "overrides": ROWS[name], "minutes": round(seconds / 60, 2),
                **{key: record["metrics"][key] for key in METRICS}, "fit_seconds": record.get("fit_seconds"),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
            print(f"  {json.loads(result.read_text())}", flush=True)


def collected() -> dict[str, list[dict]]:
    found = {name: [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{name}_s*.json"))] for name in ROWS}
    return {name: records for name, records in found.items() if records}


def report(_args) -> None:
    found = collected()
    lines = ["Bottle, 2 CPU cores, ResNet-18 at random initialisation, 224 px, 10 epochs (the model config's "
             "budget), `bottle.py run`; mean over the seeds listed. Minutes: wall time of the whole "
             "`train.py` command (training, Gaussian fit on all 448 channels, test).", "",
             "| data | row | seeds | image AUROC | pixel AUROC | AUPRO | minutes |", "|---|---|---|---|---|---|---|"]
    for name, records in found.items():
        setting, row = name.split("_", 1)
        means = {key: statistics.mean(r[key] for r in records) for key in (*METRICS, "minutes")}
        lines.append(f"| {setting} | {row} | {', '.join(str(r['seed']) for r in records)} | " +
                     " | ".join(f"{means[key]:.3f}" for key in METRICS) + f" | {means['minutes']:.1f} |")
    total = sum(r["minutes"] for records in found.values() for r in records)
    lines += ["", f"Total: {total:.0f} CPU minutes."]
    readme = (HERE / "README.md").read_text()
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    (HERE / "README.md").write_text(readme[:start] + "\n" + "\n".join(lines) + "\n" + readme[end:])
    if found:
        plot(found)


def plot(found: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(found)
    figure, axis = plt.subplots(figsize=(9, 3.6))
    width = 0.27
    for offset, key in zip((-width, 0, width), METRICS, strict=True):
        values = [statistics.mean(r[key] for r in found[name]) for name in names]
        axis.bar([i + offset for i in range(len(names))], values, width, label=key)
    axis.set_xticks(range(len(names)), [name.replace("_", "\n", 1) for name in names], fontsize=7)
    axis.set(ylim=(0.4, 1.0), ylabel="AUROC / AUPRO", title="FYD components on bottle (random-init ResNet-18, CPU)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(HERE / "bars.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("run", "report"))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--runs", type=Path, default=REPO / "logs" / "fyd_disturbed_spatial")
    args = parser.parse_args()
    {"run": run_rows, "report": report}[args.task](args)


if __name__ == "__main__":
    main()
