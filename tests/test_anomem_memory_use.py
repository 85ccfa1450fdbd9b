"""AnoMem's memory in training: the retrieval is used (issue #20's collapse), Omega follows the per-epoch
seeds, the memories start where training queries are, and the stem follows the image size."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import anomaly_lab.models.anomem.model as anomem_model
from anomaly_lab.errors import ConfigError
from anomaly_lab.models import AnoMem
from anomaly_lab.models.anomem.losses import sample_positions
from anomaly_lab.run import load_weights, train
from tests.helpers import compose_config, write_toy_cifar10

# 16 px toy images, memories of 32 and 16 patterns, batch 32; callbacks chosen per test.
TINY = ["model=anomem", "data=cifar10", "data.image_size=16", "data.batch_size=32", "data.num_workers=0",
        "model.memory_sizes=[32,16]", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1", "logger=csv"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_toy_cifar10(root, per_class_train=48, per_class_test=4)
    return root


def run(root, out, *overrides: str) -> dict:
    train(compose_config("train", [f"paths.data_root={root}", *TINY, *overrides], output_dir=out))
    return json.loads((out / "metrics.json").read_text())


def patterns_reached_by_the_gradient(run_dir) -> list[int]:
    """Per memory, how many patterns get a non-zero gradient from Eq. 7 on one training batch."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    load_weights(model, run_dir / "checkpoints" / "last.ckpt")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    model.train()
    loss, _ = model.stage1_loss(batch.views[:, :2], batch.label == 0)
    loss.backward()
    return [int((memory.patterns.grad.abs().sum(dim=0) > 0).sum()) for memory in model.memories]


def test_short_training_uses_the_memory_and_the_gradient_reaches_its_patterns(toy_root, tmp_path):
    """After 3 stage-1 epochs with the default retrieval, at least 25 % of each memory's patterns get
    1 % of some query's weight (the usage monitor, written to metrics.json) and more than one pattern
    gets gradient through the retrieval. Eq. 1 as written (hopfield_norm=none, beta 2 on raw features)
    is the collapse this guards against: on the same run it uses fewer than 25 % of the patterns, so
    this test fails for it."""
    sizes = "model.memory_sizes=[128,64]"  # a quarter of the paper's 512 and 256
    record = run(toy_root, tmp_path / "default", "callbacks=none", "model.stage1_epochs=3", sizes)
    usage = record["memory_usage"]
    assert [epoch["epoch"] for epoch in usage] == [0, 1, 2]
    for layer in ("layer3", "layer4"):
        assert usage[-1][layer]["used_fraction"] >= 0.25, usage[-1]
    assert min(patterns_reached_by_the_gradient(tmp_path / "default")) > 1

    collapsed = run(toy_root, tmp_path / "eq1", "callbacks=none", "model.stage1_epochs=3", sizes,
                    "model.hopfield_norm=none", "model.beta=2")
    assert max(collapsed["memory_usage"][-1][layer]["used_fraction"] for layer in ("layer3", "layer4")) < 0.25


def test_unused_patterns_restart_on_queries_with_their_momentum_cleared(toy_root, tmp_path):
    """memory_restart: after an epoch, the patterns no query used sit on (unit-norm, l2) queries of its
    last batch, with zero momentum (SGD's buffers in that epoch's checkpoint); not after the last epoch."""
    usage = run(toy_root, tmp_path, "model.stage1_epochs=2", "model.memory_sizes=[256,256]", "model.beta=128",
                "model.memory_restart=true", "callbacks=default", "callbacks.visualizer=null",
                "callbacks.model_checkpoint.save_top_k=-1")["memory_usage"]
    assert not any("restarted" in usage[-1][layer] for layer in ("layer3", "layer4"))
    checkpoint = torch.load(tmp_path / "checkpoints" / "epoch_000.ckpt", map_location="cpu", weights_only=False)
    momentum = [v["momentum_buffer"] for v in checkpoint["optimizer_states"][0]["state"].values()]
    for scale, layer in enumerate(("layer3", "layer4")):
        restarted = usage[0][layer]["restarted"]
        patterns = checkpoint["state_dict"][f"memories.{scale}.patterns"]
        (buffer,) = [m for m in momentum if m.shape == patterns.shape]
        cleared = buffer.abs().sum(dim=0) == 0
        assert restarted > 0 and int(cleared.sum()) == restarted, (layer, restarted, int(cleared.sum()))
        assert torch.allclose(patterns[:, cleared].norm(dim=0), torch.ones(restarted), atol=1e-5)


def test_a_resumed_run_draws_the_omega_masks_of_an_uninterrupted_one(toy_root, tmp_path, monkeypatch):
    drawn = []

    def recording(height, width, ratio, generator):
        positions = sample_positions(height, width, ratio, generator)
        drawn.append(positions.tolist())
        return positions

    monkeypatch.setattr(anomem_model, "sample_positions", recording)
    args = ["model.stage1_epochs=2", "callbacks=default", "callbacks.visualizer=null",
            "callbacks.model_checkpoint.save_top_k=-1"]
    run(toy_root, tmp_path / "whole", *args)
    whole = list(drawn)
    drawn.clear()
    run(toy_root, tmp_path / "resumed", *args, f"ckpt_path={tmp_path / 'whole' / 'checkpoints' / 'epoch_000.ckpt'}")
    assert len(drawn) > 0 and len(whole) == 2 * len(drawn)
    assert drawn == whole[len(drawn):]  # the second epoch's masks


def test_memories_start_on_features_computed_as_training_computes_queries():
    """memory_init=data: the patterns are feature vectors under batch statistics (training's batch norm),
    and the encoder's running statistics are left as they were."""
    model = AnoMem(image_size=16, memory_sizes=[8, 4], kmeans_vectors_per_image=1000)
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    running = {key: value.clone() for key, value in model.encoder.state_dict().items() if "running" in key}
    model.init_memories_from_data([SimpleNamespace(image=images)])
    assert all(torch.equal(model.encoder.state_dict()[key], value) for key, value in running.items())
    for batch_statistics, matches in ((True, True), (False, False)):  # eval mode: other features, other scale
        model.encoder.train(batch_statistics)
        with torch.no_grad():
            features = model.encoder(images)
        for memory, z in zip(model.memories, features, strict=True):
            vectors = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            nearest = torch.cdist(memory.patterns.detach().T, vectors).min(dim=1).values
            scale = vectors.norm(dim=1).median()
            assert bool((nearest < 0.01 * scale).all()) == matches, (batch_statistics, nearest / scale)


def test_stem_follows_the_image_size():
    assert AnoMem(image_size=32).encoder.stem[0].kernel_size == (3, 3)  # CIFAR: 4 x 4 maps after layer4
    assert AnoMem(image_size=[224, 224]).encoder.stem[0].kernel_size == (7, 7)  # CUB
    assert AnoMem(stem="imagenet", image_size=32).encoder.stem[0].kernel_size == (7, 7)
    with pytest.raises(ConfigError, match="model.stem=auto needs model.image_size"):
        AnoMem()
    for data, kernel in (("cifar10", (3, 3)), ("cub200", (7, 7))):
        model = instantiate(compose_config("train", ["model=anomem", f"data={data}"]).model)
        assert model.encoder.stem[0].kernel_size == kernel, data
