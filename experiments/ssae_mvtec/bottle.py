"""SSAE learning on MVTec AD bottle (../shared/data), on CPU budgets.

    python experiments/ssae_mvtec/bottle.py select [--epochs 12]
    python experiments/ssae_mvtec/bottle.py run [--rows eq1_128 eq3_128 eq1_256]
    python experiments/ssae_mvtec/bottle.py reevaluate [--rows ...]
    python experiments/ssae_mvtec/bottle.py quick
    python experiments/ssae_mvtec/bottle.py report

select: the brightness variation of the corruption (the paper's remark, section 3.2), chosen on normal
images only. One `train.py model=ssae data=mvtec/bottle` run per candidate with 20 % of the training
normals held out; the held-out normals, clean and corrupted by every candidate's corruption (seeded,
the same for every run), make a synthetic detection task: image AUROC (clean vs corrupted) and pixel
AUROC (the corruption masks). The candidate with the higher mean of the two wins. Writes
results/select.json; test images are not looked at.

run: one `train.py` run per row with the model config's defaults and the row's overrides, keeping a
checkpoint every --every epochs; each checkpoint is evaluated by `eval.py` (thresholds on the held-out
normals, then the test set): image AUROC, pixel AUROC, AUPRO and the section 4.2 thresholded metrics
after each budget, with the training minutes spent to reach it. The run's early stopping (on the
objective of corrupted held-out normals) may end it before its last epoch; its final weights are the
best epoch's; "final" is its last.ckpt evaluated the same way (what `train.py` tested). The brightness
is select's choice (results/select.json) where it exists. Writes results/<row>.json as each row finishes.

reevaluate: the same evaluation of the finished rows' checkpoints again, after a change to the scoring
only (the weights and the training minutes are kept).

quick: the README's quick command, `train.py model=ssae` (synthetic/texture, the model config's defaults),
timed; writes results/quick.json.

report: the README table block and learning_curve.png from the JSON files.
"""

from __future__ import annotations

import argparse
import csv
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
from anomaly_lab.evaluation.metrics import image_metrics  # noqa: E402
from anomaly_lab.models.ssae.corruption import PatchCorruption  # noqa: E402
from anomaly_lab.run import load_weights  # noqa: E402
from experiments.commands import run  # noqa: E402

DATA_ROOT = REPO.parent / "shared" / "data"  # paths.data_root holding mvtec/bottle
BASE = ["model=ssae", "data=mvtec/bottle"]
HELD_OUT = 0.2
BRIGHTNESS = (0.0, 0.2)
SELECT_SEED = 1234  # the held-out corruptions of `select`, the same for every candidate
# (name, what it is, overrides on top of the model config's defaults).
ROWS = [
    ("eq1_128", "objective Eq. 1, 128 px (the defaults)", []),
    ("eq3_128", "objective Eq. 3, 128 px", ["model.objective=3", "trainer.max_epochs=20"]),
    ("eq1_256", "objective Eq. 1, 256 px", ["data.image_size=256", "trainer.max_epochs=15"]),
]
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "defect_area_tpr_tnr_mean", "defect_area_image_f1",
           "defect_area_pixel_f1")
README_BEGIN, README_END = "<!-- bottle.py: begin -->", "<!-- bottle.py: end -->"


def metrics_of(run_dir: Path) -> dict[str, float]:
    record = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    return {key: record[key] for key in METRICS}


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """Per epoch, the last value of `key` in the run's metrics.csv."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["epoch"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


@torch.no_grad()
def held_out_detection(run_dir: Path) -> dict[str, float]:
    """Image and pixel AUROC of the held-out normals (clean: 0) against themselves corrupted by each candidate's
    corruption (1; pixels: the masks), scored by the run's final weights in eval mode."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    load_weights(model, run_dir / "checkpoints" / "last.ckpt")
    model.eval()
    datamodule.setup("validate")
    images = torch.cat([batch.image for batch in datamodule.val_dataloader()])
    corruptions = [PatchCorruption(brightness=b, seed=SELECT_SEED + i) for i, b in enumerate(BRIGHTNESS)]
    corrupted = [corruption(images) for corruption in corruptions]
    inputs = torch.cat([images, *(x for x, _ in corrupted)])
    outputs = [model(chunk) for chunk in inputs.split(16)]
    scores = torch.cat([out.image_score for out in outputs])
    maps = torch.cat([out.anomaly_map for out in outputs])[len(images):]
    masks = torch.cat([mask for _, mask in corrupted])
    labels = torch.cat([torch.zeros(len(images)), torch.ones(len(images) * len(corruptions))])
    pixel = image_metrics(maps.flatten(), masks.flatten().long())["image_auroc"]
    return {"image_auroc": image_metrics(scores, labels.long())["image_auroc"], "pixel_auroc": pixel}


def select(args) -> None:
    rows = []
    for brightness in BRIGHTNESS:
        run_dir = args.runs / "select" / f"brightness_{brightness}"
        seconds = run("train.py", [*BASE, f"model.brightness={brightness}", f"trainer.max_epochs={args.epochs}",
                                   f"data.val_ratio={HELD_OUT}", "callbacks=none"], run_dir, args.data_root)
        detection = held_out_detection(run_dir)
        rows.append({"brightness": brightness, **detection, "mean": (detection["image_auroc"] + detection["pixel_auroc"]) / 2,
                     "val_objective": logged(run_dir, "val/objective"), "minutes": round(seconds / 60, 1)})
        print(f"  {rows[-1]}", flush=True)
    best = max(rows, key=lambda row: row["mean"])
    write_json("select.json", {"epochs": args.epochs, "val_ratio": HELD_OUT, "rows": rows,
                               "chosen": best["brightness"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def run_rows(args) -> None:
    rows = {name: overrides for name, _, overrides in ROWS}
    if (RESULTS / "select.json").exists():  # select's brightness, also the model config's default
        chosen = json.loads((RESULTS / "select.json").read_text())["chosen"]
        rows = {name: [f"model.brightness={chosen}", *overrides] for name, overrides in rows.items()}
    checkpoints = [f"++callbacks.model_checkpoint.every_n_epochs={args.every}",
                   "callbacks.model_checkpoint.save_top_k=-1"]
    for name in args.rows:
        if (RESULTS / f"{name}.json").exists():  # finished by an earlier call
            continue
        seconds = run("train.py", [*BASE, *rows[name], *checkpoints], args.runs / name, args.data_root)
        evaluate_row(name, rows[name], seconds / 60, args)


def reevaluate(args) -> None:
    """Evaluate the finished rows' checkpoints again, after a change to the scoring only (the training
    and its minutes are kept)."""
    for name in args.rows:
        if (RESULTS / f"{name}.json").exists():
            record = json.loads((RESULTS / f"{name}.json").read_text())
            evaluate_row(name, record["overrides"], record["final"]["minutes"], args)


def evaluate_row(name: str, overrides: list[str], minutes: float, args) -> None:
    """Each checkpoint of the row's run through `eval.py` (thresholds refitted on the held-out normals);
    final: the run's last.ckpt, as `train.py` tested it."""
    run_dir = args.runs / name
    started = (run_dir / "config.yaml").stat().st_mtime  # written before the fit starts
    points = []
    for ckpt in sorted((run_dir / "checkpoints").glob("epoch_*.ckpt")):
        epoch = int(ckpt.stem.removeprefix("epoch_")) + 1
        eval_dir = args.runs / f"{name}_eval" / f"epoch_{epoch:03d}"
        run("eval.py", [f"ckpt_path={ckpt}", "fit_normal=true"], eval_dir, args.data_root)
        points.append({"epochs": epoch, "train_minutes": round((ckpt.stat().st_mtime - started) / 60, 1),
                       **metrics_of(eval_dir)})
        print(f"  {points[-1]}", flush=True)
    final_dir = args.runs / f"{name}_eval" / "final"
    run("eval.py", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "fit_normal=true"], final_dir, args.data_root)
    config = OmegaConf.load(run_dir / "config.yaml")
    write_json(f"{name}.json", {
        "row": name, "overrides": overrides, "points": points,
        "final": {"epochs": max(logged(run_dir, "train/loss_epoch")) + 1, "minutes": round(minutes, 1),
                  **metrics_of(final_dir)},
        "val_objective": logged(run_dir, "val/objective"), "train_loss": logged(run_dir, "train/loss_epoch"),
        "image_size": config.data.image_size, "model": OmegaConf.to_container(config.model),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def quick(args) -> None:
    run_dir = args.runs / "quick"
    seconds = run("train.py", ["model=ssae"], run_dir, args.runs / "synthetic_data")
    write_json("quick.json", {"command": "python train.py model=ssae", "minutes": round(seconds / 60, 1),
                              "epochs": max(logged(run_dir, "train/loss_epoch")) + 1,
                              **json.loads((run_dir / "metrics.json").read_text())["metrics"],
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def report(_args) -> None:
    lines = ["MVTec AD bottle, `bottle.py run`: each row one training run (2 CPU cores, bf16 autocast), evaluated "
             "from its checkpoint every few epochs; final: the run as `train.py` ends it (early stopping "
             "restores the best epoch by the held-out objective). Minutes: wall time of the run up to the "
             "checkpoint (training and the per-epoch validation; final: the whole command, test included).", "",
             "| row | epochs | minutes | image AUROC | pixel AUROC | AUPRO | TPR/TNR mean | image F1 | pixel F1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    found = {name: json.loads((RESULTS / f"{name}.json").read_text()) for name, _, _ in ROWS
             if (RESULTS / f"{name}.json").exists()}
    for name, record in found.items():
        final = {**record["final"], "epochs": f"{record['final']['epochs']} (final)",
                 "train_minutes": record["final"]["minutes"]}
        for point in [*record["points"], final]:
            lines.append(f"| {name} | {point['epochs']} | {point['train_minutes']:.1f} | " +
                         " | ".join(f"{point[key]:.3f}" for key in METRICS) + " |")
    if (RESULTS / "select.json").exists():
        record = json.loads((RESULTS / "select.json").read_text())
        lines += ["", f"Brightness (`bottle.py select`, {record['finished']}): {record['epochs']} epochs, "
                  f"{int(record['val_ratio'] * 100)} % of the training normals held out; the held-out normals clean "
                  "against corrupted by each candidate's corruption. No test image was looked at.", "",
                  "| brightness | held-out image AUROC | held-out pixel AUROC | mean | last val objective |",
                  "|---|---|---|---|---|"]
        for row in record["rows"]:
            last = row["val_objective"][max(row["val_objective"], key=int)]
            lines.append(f"| {row['brightness']} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | "
                         f"{row['mean']:.3f} | {last:.4f} |")
        lines.append(f"\nChosen: brightness {record['chosen']}.")
    if (RESULTS / "quick.json").exists():
        record = json.loads((RESULTS / "quick.json").read_text())
        lines += ["", f"The quick command `{record['command']}` (synthetic/texture, `bottle.py quick`, "
                  f"{record['finished']}): {record['minutes']:.1f} minutes on 2 cores, {record['epochs']} epochs "
                  f"(early stopping), image AUROC {record['image_auroc']:.3f}, pixel AUROC {record['pixel_auroc']:.3f}."]
    readme = (HERE / "README.md").read_text()
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    (HERE / "README.md").write_text(readme[:start] + "\n" + "\n".join(lines) + "\n" + readme[end:])
    if found:
        plot_curves(found)


def plot_curves(found: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (metrics_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, record in found.items():
        minutes = [p["train_minutes"] for p in record["points"]]
        for key, style in (("image_auroc", "-o"), ("pixel_auroc", "--s")):
            metrics_axis.plot(minutes, [p[key] for p in record["points"]], style, label=f"{name} {key}", markersize=4)
        epochs = sorted(record["val_objective"], key=int)
        loss_axis.plot([int(e) + 1 for e in epochs], [record["val_objective"][e] for e in epochs], label=name)
    metrics_axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    metrics_axis.set(xlabel="training minutes (2 CPU cores)", ylabel="AUROC", ylim=(0, 1), title="bottle test set")
    metrics_axis.legend(fontsize=7)
    loss_axis.set(xlabel="epoch", ylabel="objective", title="held-out normals, corrupted (val/objective)")
    loss_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(HERE / "learning_curve.png", dpi=100)


def write_json(name: str, record: dict) -> None:
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("select", "run", "reevaluate", "quick", "report"))
    parser.add_argument("--rows", nargs="+", default=[name for name, _, _ in ROWS], choices=[n for n, _, _ in ROWS])
    parser.add_argument("--epochs", type=int, default=12, help="select: epochs of each candidate")
    parser.add_argument("--every", type=int, default=5, help="run: a checkpoint (and evaluation) every so many epochs")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--runs", type=Path, default=REPO / "logs" / "ssae_mvtec")
    args = parser.parse_args()
    {"select": select, "run": run_rows, "reevaluate": reevaluate, "quick": quick, "report": report}[args.task](args)


if __name__ == "__main__":
    main()
