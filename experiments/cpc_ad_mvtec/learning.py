"""CPC-AD learning on MVTec AD bottle, on CPU budgets.

    python experiments/cpc_ad_mvtec/learning.py curve [--epochs 24] [--every 4]
    python experiments/cpc_ad_mvtec/learning.py ablation [--epochs 8]
    python experiments/cpc_ad_mvtec/learning.py report

curve: one `train.py model=cpc_ad data=mvtec/bottle data.val_ratio=0` run (the model config's defaults,
every training normal trains) for --epochs epochs, keeping a checkpoint every --every epochs; each
checkpoint is evaluated by `eval.py fit_normal=true` (the bank of normal encodings refitted on all
training normals, thresholds from their own scores): image AUROC, pixel AUROC, AUPRO after each
budget. The training loss per epoch comes from the run's metrics.csv. Writes results/curve.json.

ablation: at equal budget (--epochs at --image-size, the same batch), the model config's defaults and
one run per option flipped (norm, skip_step, separate_encoders, stem), plus the configuration before
issue #19 (batch norm, skip_step 0, one shared encoder). These runs hold out 20 % of the training normals
(`data.val_ratio=0.2`): the held-out loss, the mean sub-patch InfoNCE of the held-out normals against
the bank, is what the defaults were chosen by (comparable between runs that predict the same offsets);
the test metrics are reported beside it and chose nothing. Writes results/ablation.json.

report: writes results.md, the table block of README.md and learning_curve.png from the JSON files.
Every run goes to --runs (default logs/cpc_ad_mvtec), one after the other.
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
from anomaly_lab.run import load_weights  # noqa: E402
from experiments.commands import run  # noqa: E402

BOTTLE = REPO.parent / "shared" / "data"  # paths.data_root holding mvtec/bottle
BASE = ["model=cpc_ad", "data=mvtec/bottle"]
HELD_OUT = 0.2
# (name, overrides on top of the model config): each fix of issue #19 turned back on its own.
ABLATION = [
    ("defaults", []),
    ("norm=none", ["model.norm=none"]),
    ("norm=batch", ["model.norm=batch"]),
    ("skip_step=0", ["model.skip_step=0"]),
    ("separate encoders", ["model.separate_encoders=true"]),
    ("before #19", ["model.norm=batch", "model.skip_step=0", "model.separate_encoders=false",
                    "model.stem=imagenet"]),
    # 16 px sub-patches enter stage 1 at 16 x 16, not 4 x 4: 16 times the activations per stage, so one
    # epoch (all this session could pay) costs about what the other rows' 8 do.
    ("stem=small", ["model.stem=small", "trainer.max_epochs=1"]),
]
README_BEGIN, README_END = "<!-- learning.py: begin -->", "<!-- learning.py: end -->"


def metrics_of(run_dir: Path) -> dict:
    record = json.loads((run_dir / "metrics.json").read_text())
    return {key: record["metrics"][key] for key in ("image_auroc", "pixel_auroc", "pixel_aupro")}


def epoch_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["epoch"]): float(row["train/loss_epoch"]) for row in csv.DictReader(f)
                if row.get("train/loss_epoch")}


@torch.no_grad()
def held_out_loss(run_dir: Path) -> float:
    """Mean sub-patch InfoNCE (the anomaly score before any reduction) of the held-out normals, with the
    run's fitted bank of training encodings as negatives."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    load_weights(model, run_dir / "checkpoints" / "last.ckpt")
    model.eval()
    datamodule.setup("validate")
    scores = [model.subpatch_scores(batch.image).flatten() for batch in datamodule.val_dataloader()]
    return torch.cat(scores).mean().item()


def curve(args) -> None:
    run_dir = args.runs / "curve"
    checkpoint = [f"++callbacks.model_checkpoint.every_n_epochs={args.every}", "callbacks.model_checkpoint.save_top_k=-1"]
    seconds = run("train.py", [*BASE, "data.val_ratio=0", f"trainer.max_epochs={args.epochs}", *checkpoint],
                  run_dir, args.data_root)
    losses = epoch_losses(run_dir)
    points = []
    for epoch in range(args.every, args.epochs + 1, args.every):
        ckpt = run_dir / "checkpoints" / f"epoch_{epoch - 1:03d}.ckpt"
        eval_dir = args.runs / "curve_eval" / f"epoch_{epoch:03d}"
        eval_seconds = run("eval.py", [f"ckpt_path={ckpt}", "fit_normal=true"], eval_dir, args.data_root)
        points.append({"epochs": epoch, "train_loss": losses[epoch - 1], **metrics_of(eval_dir),
                       "eval_seconds": round(eval_seconds, 1)})
        print(f"  {points[-1]}", flush=True)
    final = {"epochs": args.epochs, **metrics_of(run_dir)}
    config = OmegaConf.load(run_dir / "config.yaml")
    write_json("curve.json", {"train_seconds": round(seconds, 1), "points": points, "final_run": final,
                              "model": OmegaConf.to_container(config.model), "image_size": config.data.image_size,
                              "batch_size": config.data.batch_size, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def ablation(args) -> None:
    rows = []
    for name, overrides in ABLATION:
        run_dir = args.runs / "ablation" / name.replace(" ", "_").replace("=", "-").replace("#", "")
        # Before the row's overrides, which may change the epochs.
        budget = [f"trainer.max_epochs={args.epochs}", f"data.image_size={args.image_size}",
                  f"data.val_ratio={HELD_OUT}", "callbacks=none"]
        row_file = run_dir / "row.json"
        if row_file.exists():  # finished by an earlier, interrupted call
            rows.append(json.loads(row_file.read_text()))
            continue
        seconds = run("train.py", [*BASE, *budget, *overrides], run_dir, args.data_root)
        losses = epoch_losses(run_dir)
        rows.append({"name": name, "overrides": overrides, "epochs": max(losses) + 1,
                     "held_out_loss": held_out_loss(run_dir), "train_loss": losses[max(losses)], **metrics_of(run_dir),
                     "minutes": round(seconds / 60, 1)})
        row_file.write_text(json.dumps(rows[-1]))
        print(f"  {rows[-1]}", flush=True)
        write_json("ablation.json", {"epochs": args.epochs, "image_size": args.image_size, "val_ratio": HELD_OUT,
                                     "rows": rows,
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def write_json(name: str, record: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(record, indent=2) + "\n")


def report(_args) -> None:
    lines = []
    if (RESULTS / "curve.json").exists():
        c = json.loads((RESULTS / "curve.json").read_text())
        lines += [
            f"Learning curve (`learning.py curve`, {c['finished']}): `python train.py model=cpc_ad data=mvtec/bottle "
            f"data.val_ratio=0`, {c['image_size']} px, batch {c['batch_size']}; the whole run ({c['final_run']['epochs']} "
            f"epochs, bank, test) took {c['train_seconds'] / 60:.1f} min on 2 cores. Each row: the checkpoint after that many epochs, its bank "
            "refitted on every training normal (`eval.py fit_normal=true`).", "",
            "| epochs | training loss | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|",
            *(f"| {p['epochs']} | {p['train_loss']:.3f} | {p['image_auroc']:.3f} | {p['pixel_auroc']:.3f} | "
              f"{p['pixel_aupro']:.3f} |" for p in c["points"]), "",
        ]
        plot_curve(c)
    if (RESULTS / "ablation.json").exists():
        a = json.loads((RESULTS / "ablation.json").read_text())
        lines += [
            f"Ablation (`learning.py ablation`, {a['finished']}): {a['epochs']} epochs each at {a['image_size']} px, "
            f"{int(a['val_ratio'] * 100)} % of the training normals held out. Held-out loss: the mean sub-patch "
            "InfoNCE of the held-out normals (what the defaults were chosen by; only rows with the same "
            "skip_step predict the same offsets and compare); the test metrics chose nothing.", "",
            "| run | overrides | epochs | held-out loss | training loss | image AUROC | pixel AUROC | AUPRO |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {r['name']} | `{' '.join(r['overrides']) or '-'}` | {r['epochs']} | {r['held_out_loss']:.3f} | "
              f"{r['train_loss']:.3f} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['pixel_aupro']:.3f} |"
              for r in a["rows"]), "",
        ]
    (HERE / "results.md").write_text("# CPC-AD on bottle: learning curve and ablation\n\n" + "\n".join(lines))
    readme = (HERE / "README.md").read_text()
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    (HERE / "README.md").write_text(readme[:start] + "\n" + "\n".join(lines) + readme[end:])


def plot_curve(c: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [p["epochs"] for p in c["points"]]
    figure, (loss_axis, auroc_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axis.plot(epochs, [p["train_loss"] for p in c["points"]], marker="o")
    loss_axis.set(xlabel="epochs", ylabel="training loss (InfoNCE)", title="loss")
    for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "AUPRO")):
        auroc_axis.plot(epochs, [p[key] for p in c["points"]], marker="o", label=label)
    auroc_axis.set(xlabel="epochs", ylim=(0, 1), title="bottle test set")
    auroc_axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(HERE / "learning_curve.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("curve", "ablation", "report"))
    parser.add_argument("--epochs", type=int, default=24, help="curve: 24; ablation: 8 gives the table")
    parser.add_argument("--image-size", type=int, default=64, help="ablation: data.image_size of every run")
    parser.add_argument("--every", type=int, default=4, help="curve: epochs between evaluated checkpoints")
    parser.add_argument("--data-root", type=Path, default=BOTTLE)
    parser.add_argument("--runs", type=Path, default=REPO / "logs" / "cpc_ad_mvtec")
    args = parser.parse_args()
    {"curve": curve, "ablation": ablation, "report": report}[args.task](args)


if __name__ == "__main__":
    main()
