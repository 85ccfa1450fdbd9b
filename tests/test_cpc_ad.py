"""CPC-AD: directional InfoNCE, test negatives, score maps, training, and detection on synthetic textures."""

from __future__ import annotations

import itertools

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from anomaly_lab.data import Batch
from anomaly_lab.errors import ConfigError
from anomaly_lab.models import CPCAD
from anomaly_lab.models.cpc_ad.encoder import PreActResNet18
from anomaly_lab.models.cpc_ad.info_nce import DIRECTIONS, context_and_target, directional_info_nce
from anomaly_lab.models.cpc_ad.patches import no_shared_pixel_skip
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
    grids = codes[: grid * grid].reshape(1, grid, grid, -1).expand(4, -1, -1, -1, -1)  # one shared encoder
    negatives = codes[-1].expand(4, 1, grid, grid, 3, grid * grid + 1)
    weights = neighbour_weights(grid, steps, alpha=30.0)
    total, count, _ = directional_info_nce(grids, negatives, weights)
    assert (total / count).max() < 1e-6  # every prediction finds its positive
    for d in range(len(DIRECTIONS)):  # any other direction's predictor misses it
        swapped = weights.clone()
        swapped[d] = weights[DIRECTIONS.index({"above": "below", "below": "above", "left": "right",
                                               "right": "left"}[DIRECTIONS[d]])]
        assert directional_info_nce(grids, negatives, swapped)[0].max() > 1.0


@pytest.mark.parametrize("skip_step", [0, 1])
def test_directional_info_nce_equals_a_brute_force_loop(skip_step):
    generator = torch.Generator().manual_seed(0)
    grid, steps, dims, n_negatives = 5, 2, 3, 2
    # Each direction with its own encodings and negatives, as separate encoders give them.
    grids = torch.randn(4, 2, grid, grid, dims, generator=generator, dtype=torch.float64)
    negatives = torch.randn(4, 2, grid, grid, n_negatives, dims, generator=generator, dtype=torch.float64)
    weights = torch.randn(4, steps, dims, dims, generator=generator, dtype=torch.float64)
    total, count, loss = directional_info_nce(grids, negatives, weights, skip_step)
    expected_total, expected_count = torch.zeros(2, grid, grid, dtype=torch.float64), torch.zeros(2, grid, grid)
    group_means = []
    for d, direction in enumerate(DIRECTIONS):
        for step in range(1, steps + 1):
            group = []
            for b, i, j in itertools.product(range(2), range(grid), range(grid)):
                offset = step + skip_step
                ti, tj = i + offset * OFFSETS[direction][0], j + offset * OFFSETS[direction][1]
                if not (0 <= ti < grid and 0 <= tj < grid):
                    continue
                value = info_nce(weights[d, step - 1] @ grids[d, b, i, j], grids[d, b, ti, tj], negatives[d, b, i, j])
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
    grids = model.patch_grids(model.encode(images))[0]  # [2, 2, 2, 3, 3, D]
    with torch.no_grad():
        direct = model.encoders[0](images[:, :, 8:16, 12:20])  # patch (1, 1) at (8, 8), its sub-patch (0, 1)
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
        normal_codes = model.encode(normals)[0].flatten(0, 2)
        test_codes = model.encode(tests)[0].flatten(0, 2)
        negatives = model.test_negatives(torch.Size([2, 2, 3, 3]))[0].flatten(0, -2)
        alone = model.score(tests[:1])
        with_others = model.score(torch.cat([tests[:1], tests[1:] * 3]))
    assert model.negative_bank.shape[1] == len(normal_codes)  # the default bank keeps every normal encoding
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
    assert banks[0].shape == (1, 20, 256) and torch.equal(banks[0], banks[1]) and not torch.equal(banks[0], banks[2])
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


@pytest.mark.parametrize(("option", "value"), [("patch_stride", 6), ("prediction_steps", 3), ("skip_step", 1),
                                               ("skip_step", -1), ("image_score", "median"), ("top_fraction", 0.0),
                                               ("norm", "layer"), ("stem", "cifar")])
def test_bad_options_name_themselves(option, value):
    with pytest.raises(ConfigError, match=f"model.{option}"):
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


# The model config on the set that random features cannot tell (synthetic/hard, 128 px: untrained CPC-AD
# 0.555, random-init PaDiM 0.580 in its calibration), trained on random 64 px crops (one patch, the
# pixel scale of the test images) for 8 epochs: a fifth of the cost of training on whole images.
PATCH_CROPS = ("data.train_augmentations=[{_target_:albumentations.RandomCrop,height:64,width:64},"
               "{_target_:albumentations.HorizontalFlip,p:0.5}]")
HARD = ["model=cpc_ad", "data=synthetic/hard", "trainer.max_epochs=8", PATCH_CROPS, *QUIET]


def test_training_beats_the_same_model_untrained_on_synthetic_hard(tmp_path):
    """Untrained: the same seed's initial weights, only the bank of normal encodings fitted
    (`trainer.max_epochs=0`); measured 0.565 untrained, 0.977 trained. With the loss turned off
    (`model.lr=0` for the same 8 epochs: the weights never move) the trained side scored 0.565, the
    untrained value, and the test fails."""
    data = f"paths.data_root={tmp_path / 'data'}"
    untrained = train(compose_config("train", [*HARD, data, "trainer.max_epochs=0"], output_dir=tmp_path / "untrained"))
    trained = train(compose_config("train", [*HARD, data], output_dir=tmp_path / "trained"))
    assert untrained["image_auroc"] <= 0.7
    assert trained["image_auroc"] >= 0.85 and trained["image_auroc"] - untrained["image_auroc"] >= 0.2


def test_the_encoder_is_a_preactivation_resnet18_cut_after_its_third_stage():
    encoder = PreActResNet18(in_channels=1, stages=3)
    assert encoder(torch.randn(2, 1, 64, 64)).shape == (2, 256)
    assert len(encoder.blocks) == 6  # two basic blocks per stage
    first = encoder.blocks[0]
    assert isinstance(first.norm1, torch.nn.BatchNorm2d) and first.norm1.num_features == 64  # norm before conv
    assert PreActResNet18(in_channels=1, stages=4)(torch.randn(1, 1, 64, 64)).shape == (1, 512)


@pytest.mark.parametrize("norm", ["group", "none", "batch"])
@pytest.mark.parametrize("training", [True, False])
def test_encodings_and_loss_do_not_depend_on_the_encoder_chunk(norm, training):
    torch.manual_seed(0)
    images = torch.randn(3, 1, 24, 24)
    results = []
    for chunk in (4, 4096):
        model = CPCAD(**{**TINY, "encoder_chunk": chunk}, norm=norm).train(training)
        model.load_state_dict(CPCAD(**TINY, norm=norm).state_dict() if not results else results[0][2])
        model.reseed_training(5)
        with torch.no_grad():
            results.append((model.encode(images), model.training_loss(images), model.state_dict()))
    (codes_small, loss_small, _), (codes_large, loss_large, _) = results
    torch.testing.assert_close(codes_small, codes_large, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_small, loss_large, rtol=1e-5, atol=1e-5)


def test_separate_encoders_give_each_direction_its_own_encodings_and_negatives():
    torch.manual_seed(0)
    model = CPCAD(**TINY, separate_encoders=True, norm="group").eval()
    images = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        model.fit_normal(loader(images))
        grids = model.patch_grids(model.encode(images))  # [4, 2, 2, 2, 3, 3, D]
        negatives = model.test_negatives(grids.shape[2:-1])
        for d, encoder in enumerate(model.encoders):
            torch.testing.assert_close(grids[d, :, 1, 1, 0, 1], encoder(images[:, :, 8:16, 12:20]))
            bank = model.negative_bank[d]
            assert torch.cdist(negatives[d].flatten(0, -2), bank).min(dim=1).values.max() < 1e-2
    assert len(model.encoders) == 4 and not torch.allclose(grids[0], grids[1])  # four models, four initialisations
    # Each direction's loss trains its own encoder only.
    model.train()
    model.predictors.data[1:] = 0  # below, left, right: constant losses, no gradient to their encoders
    model.training_loss(images).backward()
    assert model.encoders[0].stem[0].weight.grad.abs().sum() > 0
    assert all(encoder.stem[0].weight.grad.abs().sum() == 0 for encoder in model.encoders[1:])


@pytest.mark.parametrize(("size", "stride", "skip"), [(16, 8, 1), (64, 32, 1), (16, 4, 3), (16, 16, 0), (12, 8, 1)])
def test_the_default_skip_step_leaves_no_pixel_shared_with_the_first_target(size, stride, skip):
    assert no_shared_pixel_skip(size, stride) == skip
    first_offset = (skip + 1) * stride  # pixels between a context's corner and its first target's
    assert first_offset >= size and (skip == 0 or skip * stride < size)  # no shared pixel; one cell nearer shares
    model = CPCAD(patch_size=32, patch_stride=16, subpatch_size=8, subpatch_stride=4, prediction_steps=3,
                  skip_step=None)
    assert model.skip_step == 1


def test_the_small_stem_keeps_the_resolution_of_a_small_subpatch():
    small, imagenet = PreActResNet18(stem="small"), PreActResNet18(stem="imagenet")
    x = torch.randn(2, 1, 16, 16)
    assert small.stem(x).shape[-2:] == (16, 16) and imagenet.stem(x).shape[-2:] == (4, 4)
    assert small(x).shape == imagenet(x).shape == (2, 256)
