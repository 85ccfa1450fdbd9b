"""AnoMem one-class on CIFAR-10 (the pickles in ../shared/data), on a CPU budget.

    python experiments/anomem_cifar10/benchmark.py select [--classes 0 1] [--epochs 4]
    python experiments/anomem_cifar10/benchmark.py run [--classes 0 1 ... 9] [--rows anomem single ...]
    python experiments/anomem_cifar10/benchmark.py report

select: how the retrieval of Eq. 1 is chosen, on normal data only. For each candidate (Eq. 1 as written,
and L2-normalised queries and patterns with several beta) one short `train.py model=anomem data=cifar10`
run per class with 20 % of the training normals held out; on the held-out normals (eval mode, every
position of both scales) the usage of the memories (`UsageMonitor`: patterns used, effective number,
mean largest weight, distinct prototypes). Writes results/select.json; test images are not looked at.

run: one `train.py` run per (row, class) with the model config's defaults (the CPU budget), one after
the other; each row's result goes to results/rows/<row>_<class>.json as it finishes, so that an
interrupted call (or a later session) resumes where it stopped.

report: the README table block and bars.png from the row files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO))
from anomaly_lab.models.anomem.memory import UsageMonitor  # noqa: E402
from anomaly_lab.run import load_weights  # noqa: E402
from experiments.commands import run as run_command  # noqa: E402

DATA_ROOT = REPO.parent / "shared" / "data"  # holds cifar-10-batches-py
HELD_OUT = 0.2
# (name, overrides): the retrievals `select` compares.
# (name, what it is, overrides on top of `model=anomem data=cifar10`, the model config's defaults): the rows of `run`.
ROWS = [
    ("anomem", "AnoMem, two-scale memory (layer3 + layer4)", []),
    ("single", "single-scale memory (layer4)", ["model.multi_scale=false"]),
    ("kmeans", "k-means prototypes, last scale: SimCLR, Table 4(b)'s baseline",
     ["model.memory=false", "model.prototypes=kmeans", "model.multi_scale=false"]),
    ("no_memory", "no memory: SimCLR, k-means prototypes at both scales", ["model.memory=false", "model.prototypes=kmeans"]),
    ("untrained", "untrained encoder, k-means prototypes at both scales",
     ["model.memory=false", "model.prototypes=kmeans", "model.stage1_epochs=0"]),
    ("padim", "random-init PaDiM (ResNet-18, layers 1-3)", ["model=padim"]),
]
README_BEGIN, README_END = "<!-- benchmark.py: begin -->", "<!-- benchmark.py: end -->"
CANDIDATES = [("eq1 beta=2", ["model.hopfield_norm=none", "model.beta=2"])] + [
    (f"l2 beta={beta}", ["model.hopfield_norm=l2", f"model.beta={beta}"]) for beta in (4, 8, 16, 32, 64)] + [
    ("l2 beta=32 restart", ["model.hopfield_norm=l2", "model.beta=32", "model.memory_restart=true"])]


def train_run(overrides: list[str], run_dir: Path, data_root: Path) -> float:
    """train.py in run_dir (its log beside it) on CIFAR-10, AnoMem unless the overrides name a model."""
    model = [] if any(o.startswith("model=") for o in overrides) else ["model=anomem"]
    return run_command("train.py", [*model, "data=cifar10", *overrides], run_dir, data_root)


@torch.no_grad()
def held_out_usage(run_dir: Path) -> dict[str, dict[str, float]]:
    """The memories' usage by every position of the held-out normals (eval mode), per layer."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    load_weights(model, run_dir / "checkpoints" / "last.ckpt")
    model.eval()
    datamodule.setup("validate")
    monitors = [UsageMonitor(size) for size in model.memory_sizes]
    for batch in datamodule.val_dataloader():
        for scale, z in enumerate(model.encoder(batch.image)):
            monitors[scale].update(model.memories[scale].weights(z.permute(0, 2, 3, 1)))
    return {layer: monitor.summary() for layer, monitor in zip(model.layers, monitors, strict=True)}


def select(args) -> None:
    rows = []
    candidates = [c for c in CANDIDATES if args.candidates is None or c[0] in args.candidates]
    for name, overrides in candidates:
        for normal_class in args.classes:
            run_dir = args.runs / f"select_e{args.epochs}" / f"{name.replace(' ', '_').replace('=', '')}_{normal_class}"
            budget = [f"data.normal_class={normal_class}", f"model.stage1_epochs={args.epochs}",
                      f"data.val_ratio={HELD_OUT}", "callbacks=none"]
            if not (run_dir / "metrics.json").exists():  # else finished by an earlier call
                train_run([*budget, *overrides], run_dir, args.data_root)
            record = json.loads((run_dir / "metrics.json").read_text())
            rows.append({"name": name, "overrides": overrides, "normal_class": normal_class, "epochs": args.epochs,
                         "train_loss": last_logged(run_dir, "train/loss_stage1"), "held_out": held_out_usage(run_dir),
                         "training_usage": record["memory_usage"], "fit_minutes": round(record["fit_seconds"] / 60, 1)})
            print(f"  {rows[-1]}", flush=True)
            write_json(f"select_e{args.epochs}.json", {"epochs": args.epochs, "val_ratio": HELD_OUT, "rows": rows,
                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def run(args) -> None:
    rows = {name: overrides for name, _, overrides in ROWS}
    for normal_class in args.classes:  # class by class: a partial table still compares every row
        for name in args.rows:
            row_file = RESULTS / "rows" / f"{name}_{normal_class}.json"
            if row_file.exists():  # finished by an earlier call
                continue
            run_dir = args.runs / "rows" / f"{name}_{normal_class}"
            seconds = train_run([f"data.normal_class={normal_class}", *rows[name]], run_dir, args.data_root)
            record = json.loads((run_dir / "metrics.json").read_text())
            config = OmegaConf.load(run_dir / "config.yaml")
            result = {"row": name, "normal_class": normal_class, "overrides": rows[name],
                      "image_auroc": record["metrics"]["image_auroc"], "minutes": round(seconds / 60, 2),
                      "fit_seconds": record["fit_seconds"], "epochs": config.model.get("stage1_epochs"),
                      "memory_usage": record.get("memory_usage", [])[-1:],
                      "train_loss": last_logged(run_dir, "train/loss_stage1") if name != "padim" else None,
                      "commit": record.get("git_commit"), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_json(f"rows/{name}_{normal_class}.json", result)
            print(f"  {result}", flush=True)


def load_rows() -> dict[str, dict[int, dict]]:
    found: dict[str, dict[int, dict]] = {}
    for path in sorted((RESULTS / "rows").glob("*.json")):
        result = json.loads(path.read_text())
        found.setdefault(result["row"], {})[result["normal_class"]] = result
    return found


def report(_args) -> None:
    found = load_rows()
    classes = sorted({c for per_class in found.values() for c in per_class})
    complete = [c for c in classes if all(c in found.get(name, {}) for name, _, _ in ROWS)]
    lines = [f"One-class CIFAR-10, image AUROC per normal class (`benchmark.py run`; {len(complete)} of 10 classes "
             "with every row). mean: over the classes with every row; own mean: over every class the row has (n).", "",
             "| row | " + " | ".join(str(c) for c in classes) + " | mean | own mean (n) | minutes per class |",
             "|---|" + "---|" * (len(classes) + 3)]
    means = {}
    for name, description, _ in ROWS:
        per_class = found.get(name, {})
        cells = [f"{per_class[c]['image_auroc']:.3f}" if c in per_class else "-" for c in classes]
        done = [per_class[c] for c in complete]
        means[name] = sum(r["image_auroc"] for r in done) / len(done) if done else None
        minutes = sum(r["minutes"] for r in done) / len(done) if done else None
        own = [r["image_auroc"] for r in per_class.values()]
        own_mean = f"{sum(own) / len(own):.3f} ({len(own)})" if own else "-"
        lines.append(f"| {name}: {description} | " + " | ".join(cells) +
                     f" | {'-' if means[name] is None else f'{means[name]:.3f}'} | {own_mean} | "
                     f"{'-' if minutes is None else f'{minutes:.1f}'} |")
    for path in sorted(RESULTS.glob("select_e*.json"), key=lambda p: int(p.stem.removeprefix("select_e"))):
        lines += ["", *select_lines(json.loads(path.read_text()))]
    readme = (HERE / "README.md").read_text()
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    (HERE / "README.md").write_text(readme[:start] + "\n" + "\n".join(lines) + "\n" + readme[end:])
    if complete:
        plot_bars(found, complete, means)


def select_lines(record: dict) -> list[str]:
    lines = [f"Retrieval choice (`benchmark.py select`, {record['finished']}): {record['epochs']} stage-1 epochs per "
             f"class, {int(record['val_ratio'] * 100)} % of the training normals held out; usage of the memories "
             "by every position of the held-out normals (eval mode). used: patterns given >= 1 % of some query's "
             "weight; effective: exp(entropy) of the mean retrieval; max: mean largest weight per query; distinct: "
             "exp(mutual information between a query and its pattern). No test image was looked at.", "",
             "| retrieval | class | training loss | layer3 used | effective | max | distinct | "
             "layer4 used | effective | max | distinct |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        cells = []
        for layer in ("layer3", "layer4"):
            u = row["held_out"][layer]
            cells += [f"{u['used_fraction']:.0%}", f"{u['effective_patterns']:.1f}", f"{u['mean_max_weight']:.3f}",
                      f"{u['distinct_prototypes']:.1f}"]
        lines.append(f"| {row['name']} | {row['normal_class']} | {row['train_loss']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "The same runs' training queries, epoch by epoch (the usage monitor of metrics.json): layer3 patterns "
              "used and mean largest weight.", "", "| retrieval | class | layer3 used | layer3 largest weight |",
              "|---|---|---|---|"]
    for row in record["rows"]:
        usage = row["training_usage"]
        shown = usage[:-1][:: max(1, len(usage) // 5)][:5] + usage[-1:]  # about six epochs, the last included
        epochs = [epoch["layer3"] for epoch in shown]
        lines.append(f"| {row['name']} | {row['normal_class']} | epochs {', '.join(str(e['epoch'] + 1) for e in shown)}: "
                     + " -> ".join(f"{u['used_fraction']:.0%}" for u in epochs) + " | "
                     + " -> ".join(f"{u['mean_max_weight']:.2f}" for u in epochs) + " |")
    return lines


def plot_bars(found: dict, complete: list[int], means: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _, _ in ROWS]
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.bar(names, [means[name] for name in names], color="#8fb3d9")
    for i, name in enumerate(names):
        axis.scatter([i] * len(complete), [found[name][c]["image_auroc"] for c in complete], color="black", s=8)
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axis.set(ylabel="image AUROC", ylim=(0, 1),
             title=f"one-class CIFAR-10, mean over {len(complete)} classes (dots: classes)")
    figure.tight_layout()
    figure.savefig(HERE / "bars.png", dpi=100)


def last_logged(run_dir: Path, key: str) -> float | None:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        values = [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    return values[-1] if values else None


def write_json(name: str, record: dict) -> None:
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("select", "run", "report"))
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="select: 0 1; run: 0-9")
    parser.add_argument("--rows", nargs="+", default=[name for name, _, _ in ROWS], choices=[n for n, _, _ in ROWS])
    parser.add_argument("--epochs", type=int, default=4, help="select: stage-1 epochs of each candidate")
    parser.add_argument("--candidates", nargs="+", default=None, choices=[name for name, _ in CANDIDATES],
                        help="select: these retrievals only (default: all)")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--runs", type=Path, default=REPO / "logs" / "anomem_cifar10")
    args = parser.parse_args()
    if args.classes is None:
        args.classes = [0, 1] if args.task == "select" else list(range(10))
    {"select": select, "run": run, "report": report}[args.task](args)


if __name__ == "__main__":
    main()
