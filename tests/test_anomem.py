"""AnoMem end to end through the real configs: both stages in one run, stage 2 in both modes from one
stage-1 checkpoint, the Table 4 switches, the linear probe, anomaly maps, and a synthetic one-vs-all task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from anomaly_lab.errors import ConfigError
from anomaly_lab.models import AnoMem
from anomaly_lab.run import train
from tests.helpers import compose_config, write_toy_cifar10

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
         "callbacks=none",
         "logger=csv"]
# Small and fast: 16 px images, narrow memories, batch 32.
TINY = ["model=anomem", "data=cifar10", "data.image_size=16", "data.batch_size=32", "data.num_workers=0",
        "model.memory_sizes=[32,16]", "model.head_hidden=16", "model.stage1_epochs=1", "model.stage2_epochs=1",
        "model.kmeans_iters=5", "model.linear_steps=20", *QUIET]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    write_toy_cifar10(root, per_class_train=24, per_class_test=4)
    return root


def run(root: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_config("train", [f"paths.data_root={root}", *TINY, *overrides], output_dir=out)
    train(cfg)
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def stage1_run(toy_root, tmp_path_factory) -> Path:
    """One semi-supervised run: stage 1, then stage 2; its checkpoint serves as a stage-1 checkpoint."""
    out = tmp_path_factory.mktemp("stage1")
    run(toy_root, out, "model.mode=semi_supervised", "data.anomaly_ratio=0.1")
    return out


def logged(run_dir: Path) -> str:
    return "".join(p.read_text() for p in (run_dir / "csv").rglob("metrics.csv"))


def test_one_run_trains_both_stages(stage1_run):
    record = json.loads((stage1_run / "metrics.json").read_text())
    assert record["model"] == "anomem" and record["data"] == "cifar10" and record["anomaly_ratio"] == 0.1
    assert 0 <= record["metrics"]["image_auroc"] <= 1
    assert "train/loss_stage1" in logged(stage1_run) and "train/loss_stage2" in logged(stage1_run)


def test_stage2_one_class_and_semi_supervised_from_one_stage1_checkpoint(stage1_run, toy_root, tmp_path):
    ckpt = stage1_run / "checkpoints" / "last.ckpt"
    stage1 = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    one_class = run(toy_root, tmp_path / "oc", f"model.stage1_ckpt={ckpt}")
    assert 0 <= one_class["metrics"]["image_auroc"] <= 1
    assert not (tmp_path / "oc" / "csv").exists() or "train/loss" not in logged(tmp_path / "oc")  # nothing trained

    out = tmp_path / "ss"
    semi = run(toy_root, out, f"model.stage1_ckpt={ckpt}", "model.mode=semi_supervised", "data.anomaly_ratio=0.1")
    assert 0 <= semi["metrics"]["image_auroc"] <= 1
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for key in (k for k in stage1 if k.startswith(("encoder.", "memories."))):
        assert torch.equal(state[key], stage1[key]), key  # stage 2 leaves the encoder and memories frozen
    assert any(k.startswith("heads.") for k in state)
    assert "train/loss_stage2" in logged(out) and "train/loss_stage1" not in logged(out)


def test_semi_supervised_needs_labelled_anomalies(toy_root, tmp_path):
    with pytest.raises(ConfigError, match="data.anomaly_ratio > 0"):
        run(toy_root, tmp_path, "model.mode=semi_supervised")


def test_stage1_checkpoint_of_another_architecture_is_refused(stage1_run, tmp_path):
    ckpt = stage1_run / "checkpoints" / "last.ckpt"
    cfg = compose_config("train", ["model=anomem", f"model.stage1_ckpt={ckpt}", "model.multi_scale=false"], tmp_path)
    with pytest.raises(InstantiationException) as error:
        instantiate(cfg.model)
    assert isinstance(error.value.__cause__, ConfigError) and "stage1_ckpt" in str(error.value.__cause__)


def test_kmeans_baseline_single_scale_without_memory(toy_root, tmp_path):
    record = run(toy_root, tmp_path, "model.memory=false", "model.prototypes=kmeans", "model.multi_scale=false",
                 "model.stage1_epochs=1")
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith("memories.") for k in state) and "centroids_1" not in state
    assert state["centroids_0"].shape == (512, 16) and state["centroids_0"].abs().sum() > 0  # layer4 of ResNet-18
    assert 0 <= record["metrics"]["image_auroc"] <= 1


def test_prototypes_memory_needs_a_memory():
    with pytest.raises(ConfigError, match="model.memory=true"):
        AnoMem(memory=False)


def test_linear_eval_logs_accuracy_of_a_probe_on_frozen_features(toy_root, tmp_path):
    # Every class normal: labelled anomalies are none, and the training normals span the 10 classes.
    cfg = compose_config("train", [f"paths.data_root={toy_root}", *TINY, "model.linear_eval=true",
                                   "model.stage1_epochs=1"], output_dir=tmp_path)
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    datamodule.setup("fit")
    datamodule.normal_set.samples = datamodule.normal_set.samples + [
        s for s in datamodule.test_set.samples if s.target != 0]  # other classes as training normals
    with torch.no_grad():
        model.fit_linear(datamodule.normal_dataloader())
    assert model.linear_weight.shape == (10, 512) and model.linear_bias.shape == (10,)
    model.eval()
    model.on_test_epoch_start()
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            model.test_step(batch, 0)
    correct, counted = model._linear_counts.tolist()
    assert counted == sum(s.label == 0 for s in datamodule.test_set.samples) and 0 <= correct <= counted
    single_class = instantiate(cfg.data)
    single_class.setup("fit")
    with pytest.raises(ConfigError, match="several classes"), torch.no_grad():
        model.fit_linear(single_class.normal_dataloader())


def test_anomaly_map_gives_pixel_metrics_on_synthetic_mvtec_layout(tmp_path):
    cfg = compose_config("train", [f"paths.data_root={tmp_path / 'data'}", "model=anomem", "data=synthetic/texture",
                                   "data.image_size=32", "data.batch_size=16", "data.n_train=12", "data.n_test_good=4",
                                   "data.n_test_per_defect=2", "model.memory_sizes=[32,16]",
                                   "model.stage1_epochs=1", *QUIET], output_dir=tmp_path / "run")
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert {"pixel_auroc", "pixel_aupro", "image_auroc"} <= set(metrics)


def test_synthetic_one_vs_all_auroc(tmp_path):
    """Gratings of ten orientations, one normal (100 per class), one stage-1 epoch, one-class deviation
    score: a check that the pipeline ranks an easy task, not a learning test (the untrained encoder with
    k-means prototypes scores 1.0 here). With the ImageNet stem: on 16 px images the CIFAR stem that
    stem=auto picks gives inverted scores after training (0.07; 0.19 after 3 epochs), recorded in
    experiments/anomem_cifar10/README.md."""
    write_toy_cifar10(tmp_path / "data", per_class_train=100, per_class_test=6)
    record = run(tmp_path / "data", tmp_path / "run", "model.stage1_epochs=1", "model.stem=imagenet")
    assert record["metrics"]["image_auroc"] >= 0.8


@pytest.mark.parametrize("experiment", ["anomem_one_vs_all", "anomem_ood", "anomem_wmca", "anomem_ablation", "anomem_linear_eval"])
def test_paper_experiments_compose_with_the_paper_settings(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}"], output_dir=tmp_path)
    assert cfg.model.backbone == "resnet50" and cfg.model.backbone_weights is None and cfg.model.nesterov
    assert cfg.model.memory_sizes == [512, 256] and cfg.model.sampling_ratios == [0.3, 1.0]
    assert cfg.model.beta == 2.0 and cfg.model.temperature == 0.1 and cfg.model.lambda_v == 0.05
    assert cfg.model.margin == 2.0 and cfg.model.memory_init == "random"
    assert cfg.model.hopfield_norm == "none" and not cfg.model.memory_restart  # Eq. 1 as written
    assert cfg.data.batch_size in (1024, 256) and cfg.data.train_views == 2
    assert isinstance(instantiate(cfg.model), AnoMem)


def test_table_rows_switch_mode_gamma_and_ablation(tmp_path):
    cfg = compose_config("train", ["experiment=anomem_one_vs_all", "anomem_setting=ss05"], output_dir=tmp_path)
    assert cfg.model.mode == "semi_supervised" and cfg.data.anomaly_ratio == 0.05
    cfg = compose_config("train", ["experiment=anomem_wmca", "data=wmca/all"], output_dir=tmp_path)
    assert cfg.model.mode == "one_class" and cfg.data.anomaly_ratio == 0.0
    cfg = compose_config("train", ["experiment=anomem_ablation", "anomem_ablation=baseline"], output_dir=tmp_path)
    assert (cfg.model.memory, cfg.model.prototypes, cfg.model.multi_scale) == (False, "kmeans", False)
