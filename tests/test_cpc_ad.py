"""CPC-AD: directional InfoNCE, test negatives, score maps, training, and detection on synthetic textures."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from anomaly_lab.data import Batch
from anomaly_lab.errors import ConfigError
from anomaly_lab.models import CPCAD
from anomaly_lab.models.cpc_ad.encoder import PreActResNet18
from anomaly_lab.models.cpc_ad.info_nce import DIRECTIONS, context_and_target, directional_info_nce
from anomaly_lab.models.cpc_ad.scores import image_scores, subpatch_map
from anomaly_lab.nn.contrastive import info_nce
from anomaly_lab.run import train
from tests.helpers import CONF, compose_config

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks=none"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny convolutions here run several times faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# The neighbour each direction's W_k predicts from the context at (i, j): (i, j) + step * offset.
OFFSETS = {"above": (1, 0), "below": (-1, 0), "left": (0, 1), "right": (0, -1)}
TINY = dict(patch_size=16, patch_stride=8, subpatch_size=8, subpatch_stride=4, prediction_steps=2,
            negatives=4, encoder_chunk=64)


@pytest.mark.parametrize(("direction", "step"), itertools.product(DIRECTIONS, (1, 2)))
def test_each_direction_pairs_a_context_with_the_neighbour_it_should_predict(direction, step):
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    (context_rows, context_cols), (target_rows, target_cols) = context_and_target(direction, step)
    delta_rows = rows[target_rows, target_cols] - rows[context_rows, context_cols]
    delta_cols = cols[target_rows, target_cols] - cols[context_rows, context_cols]
    assert delta_rows.numel() == 5 * (5 - step)  # every context with a neighbour inside the grid
    assert (delta_rows == step * OFFSETS[direction][0]).all() and (delta_cols == step * OFFSETS[direction][1]).all()


def neighbour_weights(grid: int, steps: int, alpha: float) -> torch.Tensor:
    """W_k mapping the one-hot code of each cell to alpha times the code of its neighbour in each direction."""
    dims = grid * grid + 1  # the last axis is the negatives' own
    weights = torch.zeros(len(DIRECTIONS), steps, dims, dims)
    for d, direction in enumerate(DIRECTIONS):
        for step in range(1, steps + 1):
            for i, j in itertools.product(range(grid), repeat=2):
                ti, tj = i + step * OFFSETS[direction][0], j + step * OFFSETS[direction][1]
                if 0 <= ti < grid and 0 <= tj < grid:
                    weights[d, step - 1, ti * grid + tj, i * grid + j] = alpha
    return weights


def test_each_direction_predicts_its_own_neighbour():
    grid, steps = 4, 2
    codes = torch.eye(grid * grid + 1)
    grids = codes[: grid * grid].reshape(1, grid, grid, -1)
    negatives = codes[-1].expand(1, grid, grid, 3, grid * grid + 1)
    weights = neighbour_weights(grid, steps, alpha=30.0)
    total, count, _ = directional_info_nce(grids, negatives, weights)
    assert (total / count).max() < 1e-6  # every prediction finds its positive
    for d in range(len(DIRECTIONS)):  # any other direction's predictor misses it
        swapped = weights.clone()
        swapped[d] = weights[DIRECTIONS.index({"above": "below", "below": "above", "left": "right",
                                               "right": "left"}[DIRECTIONS[d]])]
        assert directional_info_nce(grids, negatives, swapped)[0].max() > 1.0


def test_directional_info_nce_equals_a_brute_force_loop():
    generator = torch.Generator().manual_seed(0)
    grid, steps, dims, n_negatives = 4, 2, 3, 2
    grids = torch.randn(2, grid, grid, dims, generator=generator, dtype=torch.float64)
    negatives = torch.randn(2, grid, grid, n_negatives, dims, generator=generator, dtype=torch.float64)
    weights = torch.randn(4, steps, dims, dims, generator=generator, dtype=torch.float64)
    total, count, loss = directional_info_nce(grids, negatives, weights)
    expected_total, expected_count = torch.zeros(2, grid, grid, dtype=torch.float64), torch.zeros(2, grid, grid)
    group_means = []
    for d, direction in enumerate(DIRECTIONS):
        for step in range(1, steps + 1):
            group = []
            for b, i, j in itertools.product(range(2), range(grid), range(grid)):
                ti, tj = i + step * OFFSETS[direction][0], j + step * OFFSETS[direction][1]
                if not (0 <= ti < grid and 0 <= tj < grid):
                    continue
                value = info_nce(weights[d, step - 1] @ grids[b, i, j], grids[b, ti, tj], negatives[b, i, j])
                expected_total[b, ti, tj] += value
                expected_count[b, ti, tj] += 1
                group.append(value)
            group_means.append(torch.stack(group).mean())
    torch.testing.assert_close(total, expected_total)
    torch.testing.assert_close(count, expected_count.double())
    torch.testing.assert_close(loss, torch.stack(group_means).mean())


def test_a_single_subpatch_score_lands_exactly_on_its_footprint():
    # 32 px image, 16 px patches 8 apart (3 x 3), 8 px sub-patches 4 apart (3 x 3 per patch).
    scores = torch.zeros(1, 3, 3, 3, 3)
    scores[0, 1, 2, 0, 1] = 5.0  # patch (1, 2) at (8, 16); its sub-patch (0, 1) at (8, 20)
    anomaly_map = subpatch_map(scores, patch_stride=8, subpatch_size=8, subpatch_stride=4)
    assert anomaly_map.shape == (1, 1, 32, 32)
    footprint = torch.zeros(32, 32, dtype=torch.bool)
    footprint[8:16, 20:28] = True
    assert (anomaly_map[0, 0][footprint] > 0).all() and (anomaly_map[0, 0][~footprint] == 0).all()


def test_the_map_averages_every_subpatch_instance_covering_a_pixel():
    scores = torch.zeros(1, 3, 3, 3, 3)
    # Global sub-patch (2, 2) at (8, 8) is sub-patch (2, 2) of patch (0, 0) and sub-patch (0, 0) of patch (1, 1).
    scores[0, 0, 0, 2, 2], scores[0, 1, 1, 0, 0] = 4.0, 2.0
    anomaly_map = subpatch_map(scores, patch_stride=8, subpatch_size=8, subpatch_stride=4)[0, 0]
    # Pixels (12..15, 12..15) are covered by the sub-patches at global (2..3, 2..3): 1 + 2 + 2 + 4 instances.
    assert anomaly_map[12:16, 12:16].unique().tolist() == [pytest.approx(6.0 / 9)]
    assert anomaly_map[8:12, 8:12].unique().tolist() == [pytest.approx(6.0 / 9)]  # (1..2, 1..2): 1 + 2 + 2 + 4


def test_image_scores_reduce_the_subpatch_scores():
    scores = torch.arange(40.0).reshape(1, 2, 20)
    assert image_scores(scores, "top_mean", 0.05).item() == pytest.approx((39 + 38) / 2)  # ceil(5 % of 40) = 2
    assert image_scores(scores, "max", 0.05).item() == 39 and image_scores(scores, "mean", 0.05).item() == 19.5


def test_overlapping_patches_share_the_encodings_of_their_common_subpatches():
    model = CPCAD(**TINY).eval()
    images = torch.randn(2, 1, 24, 24)
    grids = model.patch_grids(model.encode(images))  # [2, 2, 2, 3, 3, D]
    with torch.no_grad():
        direct = model.encoder(images[:, :, 8:16, 12:20])  # patch (1, 1) at (8, 8), its sub-patch (0, 1)
    torch.testing.assert_close(grids[:, 1, 1, 0, 1], direct)
    # Global sub-patch (2, 2) is sub-patch (0, 0) of patch (1, 1) and sub-patch (0, 2) of patch (1, 0).
    torch.testing.assert_close(grids[:, 1, 0, 0, 2], grids[:, 1, 1, 0, 0])


def loader(images: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(images), batch_size=4, collate_fn=lambda items: Batch(
        image=torch.stack([i[0] for i in items]), label=torch.zeros(len(items), dtype=torch.long),
        mask=None, path=[""] * len(items), target=None))


def test_test_negatives_come_from_the_normal_bank_never_from_the_test_images():
    torch.manual_seed(0)
    model = CPCAD(**TINY).eval()
    normals, tests = torch.randn(6, 1, 24, 24), torch.randn(3, 1, 24, 24) + 5
    with torch.no_grad():
        model.fit_normal(loader(normals))
        normal_codes = model.encode(normals).flatten(0, 2)
        test_codes = model.encode(tests).flatten(0, 2)
        negatives = model.test_negatives(torch.Size([2, 2, 3, 3])).flatten(0, -2)
        alone = model.score(tests[:1])
        with_others = model.score(torch.cat([tests[:1], tests[1:] * 3]))
    assert len(model.negative_bank) == len(normal_codes)  # the default bank keeps every normal encoding
    # Each negative is a normal encoding (up to batch-size rounding), far from every test encoding.
    assert torch.cdist(negatives, normal_codes).min(dim=1).values.max() < 1e-2
    assert torch.cdist(negatives, test_codes).min() > 1.0
    # An image's scores do not depend on the other images of its batch.
    torch.testing.assert_close(with_others.image_score[:1], alone.image_score)
    torch.testing.assert_close(with_others.anomaly_map[:1], alone.anomaly_map)


def test_the_bank_is_drawn_with_the_seed_and_survives_a_checkpoint():
    normals = torch.randn(6, 1, 24, 24)
    banks = []
    for seed in (0, 0, 1):
        torch.manual_seed(0)
        model = CPCAD(**TINY, negative_bank_size=20, seed=seed).eval()
        with torch.no_grad():
            model.fit_normal(loader(normals))
        banks.append(model.negative_bank)
    assert banks[0].shape == (20, 256) and torch.equal(banks[0], banks[1]) and not torch.equal(banks[0], banks[2])
    restored = CPCAD(**TINY, negative_bank_size=20)
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.negative_bank, banks[2])


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = CPCAD(**TINY, norm="none", lr=1e-3)
    # Smooth images, so that neighbouring sub-patches are predictable from each other.
    images = torch.nn.functional.interpolate(torch.randn(4, 1, 6, 6), size=(24, 24), mode="bicubic")
    optimizer = model.configure_optimizers()

    def loss_with_fixed_negatives() -> float:
        model.reseed_training(123)
        with torch.no_grad():
            return model.training_loss(images).item()

    before = loss_with_fixed_negatives()
    for _ in range(15):
        optimizer.zero_grad()
        model.training_loss(images).backward()
        optimizer.step()
    assert loss_with_fixed_negatives() < 0.9 * before


@pytest.mark.parametrize(("option", "value"), [("patch_stride", 6), ("prediction_steps", 3),
                                               ("image_score", "median"), ("top_fraction", 0.0), ("norm", "layer")])
def test_bad_options_name_themselves(option, value):
    with pytest.raises(ConfigError, match=option if option != "norm" else "model.norm"):
        CPCAD(**{**TINY, option: value})


def test_images_the_patches_do_not_tile_are_refused():
    with pytest.raises(ConfigError, match="data.image_size"):
        CPCAD(**TINY).encode(torch.randn(1, 1, 30, 30))


def test_the_model_config_sets_grayscale_and_the_paper_augmentations(tmp_path):
    cfg = compose_config("train", ["model=cpc_ad", "data=mvtec/bottle"], output_dir=tmp_path)
    assert cfg.data.channels == 1 and cfg.model.in_channels == 1
    crop, flip = cfg.data.train_augmentations
    assert crop.scale == [0.64, 1.0] and list(crop.size) == [cfg.data.image_size] * 2 and flip.p == 0.5
    paper = compose_config("train", ["experiment=cpc_ad_mvtec"], output_dir=tmp_path)
    assert (paper.data.image_size, paper.model.patch_size, paper.model.subpatch_size) == (768, 256, 64)
    assert (paper.trainer.max_epochs, paper.data.batch_size, paper.model.negatives, paper.model.lr) == (150, 16, 16, 1.5e-4)
    sweep = OmegaConf.load(CONF / "experiment" / "cpc_ad_mvtec.yaml").hydra.sweeper.params
    assert sweep.data == "glob(mvtec/*)"  # one model per MVTec category


def test_cpc_ad_detects_synthetic_texture_defects(tmp_path):
    # The model config's CPU defaults: 64 px images as one patch of 7 x 7 sub-patches, 8 epochs.
    cfg = compose_config("train", ["model=cpc_ad", f"paths.data_root={tmp_path / 'data'}", *QUIET], output_dir=tmp_path)
    assert (cfg.data.image_size, cfg.model.patch_size, cfg.model.subpatch_size, cfg.trainer.max_epochs) == (64, 64, 16, 8)
    metrics = train(cfg)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["model"] == "cpc_ad" and record["category"] == "texture"
    assert metrics["image_auroc"] >= 0.85


def test_the_encoder_is_a_preactivation_resnet18_cut_after_its_third_stage():
    encoder = PreActResNet18(in_channels=1, stages=3)
    assert encoder(torch.randn(2, 1, 64, 64)).shape == (2, 256)
    assert len(encoder.blocks) == 6  # two basic blocks per stage
    first = encoder.blocks[0]
    assert isinstance(first.norm1, torch.nn.BatchNorm2d) and first.norm1.num_features == 64  # norm before conv
    assert PreActResNet18(in_channels=1, stages=4)(torch.randn(1, 1, 64, 64)).shape == (1, 512)
