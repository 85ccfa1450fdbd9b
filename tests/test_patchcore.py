"""PatchCore: the coreset against a brute-force greedy k-center, the nearest-neighbour search and the
scores of Eq. 6-7 against direct computations, the coreset's covering radius against a random subset's,
the DDP gather into dataset order, and the configuration errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from anomaly_lab.errors import ConfigError
from anomaly_lab.models import AnomalyModel, Patchcore
from anomaly_lab.nn.coreset import greedy_coreset, nearest_neighbours
from anomaly_lab.run import train
from tests.helpers import compose_config

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks=none"]


def brute_force_greedy(points: torch.Tensor, size: int, start: int) -> torch.Tensor:
    """Greedy k-center as written: float64, distances by explicit differences, one pass per step."""
    points = points.double()
    nearest = torch.full((len(points),), float("inf"), dtype=torch.float64)
    centers = [start]
    for _ in range(size - 1):
        nearest = torch.minimum(nearest, (points - points[centers[-1]]).square().sum(dim=1))
        nearest[centers] = -1
        centers.append(int(nearest.argmax()))
    return torch.tensor(centers)


@pytest.mark.parametrize("block_size", [None, 1, 7, 64, 5000])
def test_greedy_coreset_selects_the_brute_force_indices(block_size):
    points = torch.randn(1500, 12, generator=torch.Generator().manual_seed(0)) * 3 + 1
    expected = brute_force_greedy(points, 200, start=17)
    torch.testing.assert_close(greedy_coreset(points, 200, start=17, block_size=block_size), expected)


def test_greedy_coreset_covers_the_points_better_than_a_random_subset():
    """Eq. 4's objective, the largest distance from a point to its nearest center, on clustered points."""
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(40, 8, generator=generator) * 10
    points = centres[torch.randint(40, (4000,), generator=generator)] + torch.randn(4000, 8, generator=generator)

    def radius(index: torch.Tensor) -> float:
        return float(nearest_neighbours(points, points[index])[0].max())

    greedy = radius(greedy_coreset(points, 100, start=0))
    random = radius(torch.randperm(4000, generator=generator)[:100])
    assert greedy < 0.6 * random, (greedy, random)


def test_nearest_neighbours_match_cdist():
    generator = torch.Generator().manual_seed(2)
    queries, bank = torch.randn(300, 10, generator=generator), torch.randn(500, 10, generator=generator)
    distances, index = nearest_neighbours(queries, bank, k=4, chunk=64)
    expected = torch.cdist(queries.double(), bank.double()).topk(4, dim=1, largest=False)
    torch.testing.assert_close(index, expected.indices)
    torch.testing.assert_close(distances.double(), expected.values, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A PatchCore on synthetic texture (64 px), the patch features of its training normals, its datamodule."""
    folder = tmp_path_factory.mktemp("patchcore")
    cfg = compose_config("train", ["model=patchcore", "data.image_size=64", f"paths.data_root={folder / 'data'}",
                                   "model.coreset_ratio=0.25", *QUIET], output_dir=folder / "run")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model).eval()
    with torch.no_grad():
        model.fit_normal(datamodule.normal_dataloader())
        features = torch.cat([model.embed(b.image).flatten(2).transpose(1, 2) for b in datamodule.normal_dataloader()])
    return model, features.flatten(0, 1), datamodule


def test_memory_bank_is_the_greedy_coreset_of_the_training_patches(fitted):
    model, features, _ = fitted
    assert model.memory_bank.shape == (int(len(features) * 0.25), 384)  # ResNet-18 layers 2 + 3
    # Every bank row is a training patch feature, and no patch twice.
    index = nearest_neighbours(model.memory_bank, features)[1].squeeze(1)
    torch.testing.assert_close(features[index], model.memory_bank)
    assert len(index.unique()) == len(index)


def test_scores_follow_equations_6_and_7(fitted):
    model, _, datamodule = fitted
    images = next(iter(datamodule.test_dataloader())).image[:6]
    with torch.no_grad():
        out = model.score(images)
        patches = model.embed(images).flatten(2).transpose(1, 2).double()  # [B, P, D]
    bank = model.memory_bank.double()
    for image, patch_features in enumerate(patches):
        distances = torch.cdist(patch_features, bank)  # [P, M]
        patch_scores, nearest = distances.min(dim=1)
        torch.testing.assert_close(out.anomaly_map[image].flatten().double(), patch_scores, atol=1e-3, rtol=1e-4)
        s_star, position = patch_scores.max(dim=0)  # Eq. 6
        anchor = nearest[position]
        support = torch.cdist(bank[anchor][None], bank)[0].topk(9, largest=False).indices  # N_b(m*), m* first
        to_support = (bank[support] - patch_features[position]).norm(dim=1)
        expected = (1 - to_support[0].exp() / to_support.exp().sum()) * s_star  # Eq. 7
        # float32 distances from ||x||^2 + ||y||^2 - 2xy against float64 cdist: up to ~1e-3 relative
        assert float(out.image_score[image]) == pytest.approx(float(expected), rel=2e-3)


def test_one_neighbour_scores_the_largest_patch_distance(fitted):
    model, _, datamodule = fitted
    plain = Patchcore(backbone_weights=None, num_neighbors=1)
    plain.load_state_dict(model.state_dict())
    images = next(iter(datamodule.test_dataloader())).image[:4]
    with torch.no_grad():
        out = plain.score(images)
    torch.testing.assert_close(out.image_score, out.anomaly_map.flatten(1).amax(dim=1))


def test_the_coreset_keeps_the_scores_of_the_whole_bank(tmp_path):
    """On synthetic texture a quarter of the patches scores the test set as well as all of them do."""
    common = ["model=patchcore", "data.image_size=64", f"paths.data_root={tmp_path / 'data'}", *QUIET]
    whole = train(compose_config("train", [*common, "model.coreset_ratio=1.0"], output_dir=tmp_path / "whole"))
    coreset = train(compose_config("train", [*common, "model.coreset_ratio=0.25"], output_dir=tmp_path / "coreset"))
    assert whole["image_auroc"] > 0.9 and whole["pixel_auroc"] > 0.85
    for metric in ("image_auroc", "pixel_auroc"):
        assert coreset[metric] == pytest.approx(whole[metric], abs=0.02), metric


def test_gather_in_dataset_order_undoes_the_strided_shards(monkeypatch):
    """Three devices hold images 0, 3, 6, ... / 1, 4, 7, ... / 2, 5, 8, ...; the gather restores 0..9."""
    images = torch.arange(10).view(10, 1) * 10 + torch.arange(2)  # row i belongs to image i
    shards = [images[rank::3] for rank in range(3)]
    monkeypatch.setattr(AnomalyModel, "gather_across_devices", lambda self, tensor: torch.cat(shards))
    model = AnomalyModel()
    model._trainer = SimpleNamespace(world_size=3)
    torch.testing.assert_close(model.gather_in_dataset_order(shards[0]), images)


@pytest.mark.parametrize("key, value", [("coreset_ratio", 0.0), ("coreset_ratio", 1.5), ("projection_dim", 0),
                                        ("num_neighbors", 0), ("layers", ["layer9"])])
def test_bad_options_are_named(key, value):
    with pytest.raises(ConfigError, match=key if key != "layers" else "model.layers"):
        Patchcore(backbone_weights=None, **{key: value})
