"""One measurement per process, and what the benchmark files share.

Every benchmark file runs each of its measurements in a fresh interpreter (`run_task`: the file
re-invoked as `<file> task <name> <arguments as JSON> <result JSON path>`, answered by `task_main`),
one at a time, so every peak resident set size (`ru_maxrss` of that process, loader workers
excluded) belongs to that task alone and one task's imports or caches never speed up or slow down
another. This file's own tasks, for run.py (PaDiM against anomalib) and the other benchmarks:

- ours: our PaDiM through our datamodule, Trainer and Evaluator (validate = Gaussian fit +
  thresholds, then test, timed), then the test loader and the forward alone (timed), then the
  forward alone on the test batches held in memory (timed);
- fit_memory: only our Gaussian fit on the first `n_images` training normals;
- references: the pipeline's two limits, bare decoding + resizing and the bare backbone forward
  (and both at once);
- peer: anomalib's PaDiM through its MVTecAD datamodule and Engine (fit, then test, timed).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHARED_DATA = HERE.parents[2] / "shared" / "data"  # ../shared/data beside the repository
BOTTLE = SHARED_DATA / "mvtec" / "bottle"
IMAGE_SIZE = 256
BATCH_SIZE = 16  # for every loader and the bare backbone; see README
N_FEATURES = 100


# --- what every benchmark file shares -----------------------------------------------------------
def run_task(script: str | Path, name: str, **arguments) -> dict:
    """Run task `name` of a benchmark file in a fresh interpreter and return its result; stop the
    benchmark with the task's output if it fails."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        print(f"[bench] {Path(script).stem} {name} {json.dumps(arguments)}", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing may try to download
        command = [sys.executable, str(script), "task", name, json.dumps(arguments), str(result)]
        process = subprocess.run(command, capture_output=True, text=True, env=env)
        if process.returncode != 0:
            print(process.stdout[-2000:] + process.stderr[-4000:], file=sys.stderr)
            sys.exit(f"error: benchmark task {name} of {script} failed (exit status {process.returncode})")
        return json.loads(result.read_text())


def task_main(tasks: dict[str, Callable[..., dict]]) -> None:
    """Answer `run_task`: `<file> task <name> <arguments as JSON> <result JSON path>`."""
    name, arguments, result_path = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
    quiet()
    result_path.write_text(json.dumps(tasks[name](**arguments), indent=2))


def entry_point(tasks: dict[str, Callable[..., dict]], main: Callable[[], None]) -> None:
    """A benchmark file's `__main__`: one of its `tasks` when `run_task` invoked it, else its `main`."""
    task_main(tasks) if sys.argv[1:2] == ["task"] else main()


def write_results(name: str, record: dict, markdown: str) -> None:
    """results/<name>.json (every figure) and results/<name>.md, and the Markdown on standard output."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def machine_info() -> dict:
    """CPU, core count, package versions and the load average now (other jobs may share the cores)."""
    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **{name: package(name) for name in ("torch", "torchvision", "pytorch-lightning", "anomalib")},
        "load_average_start": load_average(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- this file's tasks --------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_image_paths(category_dir: Path) -> list[Path]:
    return sorted(category_dir.glob("test/*/*.png"))


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """The median wall time of `repeats` calls of `run`."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "anomalib"):
        logging.getLogger(name).setLevel(logging.ERROR)


def ours(category_dir: str, seed: int, num_workers: int, repeats: int = 1, cache: str = "none",
         cache_dir: str | None = None) -> dict:
    """Our run as anomaly_lab.run assembles it: validate (Gaussian fit, thresholds), then test, timed;
    then the test images through the test loader and the model's forward alone, `repeats` times (median).
    `cache`, `cache_dir`: data.cache and data.cache_dir (a disk cache there is built by the validation
    if it is not there yet)."""
    import pytorch_lightning as pl
    import torch

    from anomaly_lab.data import MVTecDataModule
    from anomaly_lab.evaluation import Evaluator
    from anomaly_lab.models import Padim

    category_dir = Path(category_dir)
    pl.seed_everything(seed, verbose=False)
    datamodule = MVTecDataModule(category_dir.parent, category_dir.name, image_size=IMAGE_SIZE,
                                 batch_size=BATCH_SIZE, num_workers=num_workers, seed=seed, cache=cache,
                                 cache_dir=cache_dir)
    model = Padim(backbone="resnet18", backbone_weights=None, n_features=N_FEATURES, seed=seed)
    baseline = peak_rss_mb()
    evaluator = Evaluator()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluator],
                         **model.trainer_settings)
    trainer.validate(model, datamodule=datamodule, verbose=False)  # fits the Gaussian, then the thresholds
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    peak = peak_rss_mb()

    # What trainer.test does without the Evaluator: decoding, resizing, normalising, the forward.
    model.eval()
    with torch.inference_mode():
        pipeline_seconds = median_seconds(lambda: [model(batch.image) for batch in datamodule.test_dataloader()],
                                          repeats)
        # The model alone on the same batches held in memory: the ceiling of the loader + forward.
        batches = [batch.image for batch in datamodule.test_dataloader()]
        model_seconds = median_seconds(lambda: [model(images) for images in batches], repeats)

    test_images = len(datamodule.test_set)
    return {
        "seed": seed,
        "cache": cache,
        "image_auroc": evaluator.results["image_auroc"],
        "pixel_auroc": evaluator.results["pixel_auroc"],
        "pixel_aupro": evaluator.results["pixel_aupro"],
        "train_images": len(datamodule.normal_set),
        "fit_seconds": model.fit_normal_seconds,
        "test_images": test_images,
        "test_seconds": test_seconds,
        "test_images_per_second": test_images / test_seconds,
        "pipeline_images_per_second": test_images / pipeline_seconds,
        "model_images_per_second": test_images / model_seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
    }


def fit_memory(category_dir: str, n_images: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset

    from anomaly_lab.data import Batch, MVTecDataModule
    from anomaly_lab.models import Padim

    category_dir = Path(category_dir)
    # A small holdout so that at least `n_images` normals remain to fit on.
    datamodule = MVTecDataModule(category_dir.parent, category_dir.name, image_size=IMAGE_SIZE, val_ratio=0.01)
    datamodule.setup()
    if len(datamodule.normal_set) < n_images:
        raise ValueError(f"{category_dir} has {len(datamodule.normal_set)} training normals, {n_images} asked")
    loader = DataLoader(Subset(datamodule.normal_set, range(n_images)), batch_size=BATCH_SIZE, collate_fn=Batch.collate)
    model = Padim(backbone="resnet18", backbone_weights=None, n_features=N_FEATURES).eval()
    baseline = peak_rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        model.fit_normal(loader)
    return {
        "train_images": n_images,
        "fit_seconds": time.perf_counter() - start,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "increase_mb": peak_rss_mb() - baseline,
    }


def references(category_dir: str, repeats: int, seed: int = 0, num_workers: int = 0, image_size: int = IMAGE_SIZE,
               batch_size: int = BATCH_SIZE) -> dict:
    """The limits of the test pipeline over the test images, each timed `repeats` times (median):

    - decode_resize: bare decoding + resizing (cv2, in this process, no normalisation, no model);
    - backbone: the bare forward of torchvision's ResNet-18 conv1 to layer3 (the weights our model
      gets with `seed`) over the images pre-decoded, normalised and stacked, batch after batch;
    - with `num_workers` > 0, also bare_pipeline: both at once, as a pipeline does them, decoding in
      `num_workers` loader processes while the backbone runs (diagnostic, not part of the limit).
    """
    import torch
    from torch.utils.data import DataLoader

    paths = test_image_paths(Path(category_dir))
    decode_seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        images = [decode_resize(path, image_size) for path in paths]
        decode_seconds.append(time.perf_counter() - start)
    stacked = torch.stack([normalised_tensor(image) for image in images])

    layers_1_to_3 = bare_backbone(seed)

    def backbone_seconds(batches) -> float:
        return median_seconds(lambda: [layers_1_to_3(batch) for batch in batches()], repeats)

    rates = {"decode_resize_images_per_second": len(paths) / statistics.median(decode_seconds)}
    with torch.inference_mode():
        layers_1_to_3(stacked[:batch_size])  # warm-up
        rates["backbone_images_per_second"] = len(paths) / backbone_seconds(lambda: stacked.split(batch_size))
        if num_workers:
            loader = DataLoader(BareImages(paths, image_size), batch_size=batch_size, num_workers=num_workers)
            rates["bare_pipeline_images_per_second"] = len(paths) / backbone_seconds(lambda: loader)
    return {"seed": seed, "test_images": len(paths), "image_size": image_size, "batch_size": batch_size,
            "torch_threads": torch.get_num_threads(), **rates}


def bare_backbone(seed: int = 0):
    """The bare forward of the limits: torchvision's ResNet-18, conv1 to layer3, eval mode, at the
    random initialisation `seed` draws (the weights our models get with that seed)."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    net = resnet18().eval()

    def layers_1_to_3(x: torch.Tensor) -> torch.Tensor:
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer3(net.layer2(net.layer1(x)))

    return layers_1_to_3


def decode_resize(path: Path, size: int):
    import cv2

    return cv2.resize(cv2.imread(str(path), cv2.IMREAD_COLOR), (size, size))


def normalised_tensor(bgr):
    """A BGR uint8 image as the normalised RGB float tensor [3, H, W] our transforms give."""
    import torch

    from anomaly_lab.data import IMAGENET_MEAN, IMAGENET_STD

    rgb = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1).float().div(255)
    return (rgb - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


class BareImages:
    """The test images decoded, resized and normalised on access: the bare pipeline's dataset."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return normalised_tensor(decode_resize(self.paths[index], self.size))


def anomalib_mvtec(category_dir: str, seed: int, num_workers: int):
    """anomalib's MVTecAD datamodule for one category folder, after seeding every generator with `seed`."""
    from anomalib.data import MVTecAD
    from lightning.pytorch import seed_everything

    category_dir = Path(category_dir)
    seed_everything(seed, verbose=False)
    return MVTecAD(root=category_dir.parent, category=category_dir.name, train_batch_size=BATCH_SIZE,
                   eval_batch_size=BATCH_SIZE, num_workers=num_workers, seed=seed)


def anomalib_fit_and_test(model, datamodule) -> tuple[dict, float, float]:
    """anomalib's Engine on the CPU, without checkpoints or progress output: (test results, fit s, test s)."""
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.engine import Engine

    with tempfile.TemporaryDirectory() as workdir:
        no_checkpoints = ModelCheckpoint(dirpath=workdir, save_top_k=0, save_last=False)
        engine = Engine(accelerator="cpu", devices=1, default_root_dir=workdir, callbacks=[no_checkpoints],
                        enable_progress_bar=False, enable_model_summary=False)
        start = time.perf_counter()
        engine.fit(model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        results = engine.test(model, datamodule=datamodule, verbose=False)[0]
        return results, fit_seconds, time.perf_counter() - start


def peer(category_dir: str, seed: int, num_workers: int) -> dict:
    from anomalib.models import Padim

    datamodule = anomalib_mvtec(category_dir, seed, num_workers)
    # Our benchmark runs no visualizer either; anomalib's default pre-processor resizes to 256 x 256.
    model = Padim(backbone="resnet18", pre_trained=False, n_features=N_FEATURES, visualizer=False)
    baseline = peak_rss_mb()
    results, _, test_seconds = anomalib_fit_and_test(model, datamodule)
    test_images = len(datamodule.test_data)
    return {
        "seed": seed,
        "image_auroc": results["image_AUROC"],
        "pixel_auroc": results.get("pixel_AUROC"),
        "train_images": len(datamodule.train_data),
        "test_images": test_images,
        "test_seconds": test_seconds,
        "test_images_per_second": test_images / test_seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
    }


TASKS = {"ours": ours, "fit_memory": fit_memory, "references": references, "peer": peer}

if __name__ == "__main__":
    task_main(TASKS)
