"""The datamodule base: normal training images (plus, optionally, labelled anomalies), a held-out
normal validation split, a labelled test set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from anomaly_lab.data.batch import Batch
from anomaly_lab.data.dataset import AnomalyDataset, Sample
from anomaly_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, as_size, build_transform, channel_stats
from anomaly_lab.errors import ConfigError, DataError


def split_holdout(count: int, val_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, held out) of `count` items: round(val_ratio * count) held out, at least 1, drawn with `seed`."""
    if count < 2:
        raise DataError(f"need at least 2 training images to hold one out for validation, found {count}")
    n_holdout = min(max(1, round(val_ratio * count)), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_holdout:]), sorted(order[:n_holdout])


def labelled_anomaly_count(n_normal: int, ratio: float) -> int:
    """How many labelled anomalies make the fraction `ratio` (gamma) of a training set holding `n_normal`
    normals: round(ratio / (1 - ratio) * n_normal), so that anomalies / (normals + anomalies) ~ ratio."""
    return round(ratio / (1 - ratio) * n_normal)


def draw_labelled_anomalies(pool: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """`count` samples of `pool` drawn uniformly without replacement with `seed`, in pool order."""
    if count > len(pool):
        raise DataError(
            f"data.anomaly_ratio asks for {count} labelled anomalies but only {len(pool)} are available for training"
        )
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in sorted(order[:count])]


@dataclass
class SampleSplit:
    """What `find_samples` lists: training normals, test samples, candidate labelled anomalies for the
    semi-supervised setting (label 1, drawn per `anomaly_ratio`), and explicit validation normals
    (None: a holdout of the training normals)."""

    normals: list[Sample]
    test: list[Sample]
    anomaly_pool: list[Sample] = field(default_factory=list)
    validation: list[Sample] | None = None


class EpochSampler(DistributedSampler):
    """The training order: a permutation drawn from (seed, epoch), this rank's share of it, as
    ``(index, epoch)`` keys so the dataset seeds each image's augmentations from (seed, epoch, index).

    Order and augmentations are thus a function of the seed and the epoch alone: the same for any
    number of loader workers, the same after resuming from a checkpoint, and the same images
    (split over the ranks) under DDP. Lightning calls `set_epoch` and, as this is a
    DistributedSampler, does not replace it.
    """

    def __iter__(self):
        return ((index, self.epoch) for index in super().__iter__())


class ShardSampler(DistributedSampler):
    """Evaluation order: every `num_replicas`-th index from `rank`, without the padding of
    DistributedSampler, so each image is scored exactly once whatever the number of devices."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class AnomalyDataModule(pl.LightningDataModule):
    """Base of the datasets: subclasses only list their samples in `find_samples`.

    Train: the training normals minus a validation holdout (`val_ratio` of them, at least one,
    drawn with `seed`), with `train_augmentations`. Validation: the holdout (or the subclass's own
    validation normals). Test and predict: the test set. Every loader yields :class:`Batch`.

    Semi-supervised setting: with `anomaly_ratio` (gamma) > 0, labelled anomalies (label 1 in the
    Batch) drawn from the subclass's anomaly pool with `sample_seed` (default: `seed`) join the
    training loader, as the fraction gamma of it (see `labelled_anomaly_count`). They never join the
    validation holdout (thresholds come from normal images only) nor `normal_dataloader` (statistics of
    normal data). gamma = 0 is the one-class setting.

    Contrastive views: with `train_views` = V > 0, every training Batch also carries `views`
    [B, V, C, H, W], V independent draws of resize -> `view_augmentations` -> normalise on each image
    (e.g. SimCLR's two views), seeded per image and epoch as the training augmentations are.
    Validation, test and normal loaders have no views.

    Attributes: `dataset_name`, `category`, `has_masks`, `mean` and `std` (one value per channel,
    as used by Normalize), `image_size` ((h, w) of the yielded images: `crop_size` when set),
    `channels`.
    """

    dataset_name: str = ""
    has_masks: bool = True

    def __init__(
        self,
        root: str,
        category: str,
        image_size: int | Sequence[int] = 256,
        crop_size: int | Sequence[int] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_ratio: float = 0.1,
        seed: int = 0,
        train_augmentations: Sequence[A.BasicTransform] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channels: int = 3,
        anomaly_ratio: float = 0.0,
        sample_seed: int | None = None,
        train_views: int = 0,
        view_augmentations: Sequence[A.BasicTransform] | None = None,
    ):
        super().__init__()
        if not 0 <= val_ratio < 1:
            raise ConfigError(f"data.val_ratio={val_ratio} must be in [0, 1)")
        if not 0 <= anomaly_ratio < 1:
            raise ConfigError(
                f"data.anomaly_ratio={anomaly_ratio} must be in [0, 1): the fraction of labelled anomalies "
                "in the training set (0 = one-class)"
            )
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ConfigError(
                f"data.batch_size={batch_size} and data.eval_batch_size={eval_batch_size} must be >= 1"
            )
        self.root = Path(root).expanduser()
        self.category = str(category)
        self.resize_size = as_size(image_size, "data.image_size")
        self.crop_size = None if crop_size is None else as_size(crop_size, "data.crop_size")
        self.image_size = self.crop_size or self.resize_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_ratio = val_ratio
        self.seed = seed
        self.anomaly_ratio = anomaly_ratio
        self.sample_seed = seed if sample_seed is None else sample_seed
        self.train_augmentations = list(train_augmentations or [])
        if train_views < 0 or (train_views > 0 and not view_augmentations):
            raise ConfigError(
                f"data.train_views={train_views} must be >= 0, and > 0 needs data.view_augmentations "
                "(a list of albumentations transforms)"
            )
        self.train_views = train_views
        self.view_augmentations = list(view_augmentations or [])
        self.channels = channels
        self.mean = channel_stats(mean, channels, "mean")
        self.std = channel_stats(std, channels, "std")
        self.train_set = self.normal_set = self.val_set = self.test_set = None

    def find_samples(self) -> SampleSplit | tuple[list[Sample], list[Sample]]:
        """A :class:`SampleSplit`, or (training normals, test samples), after checking the layout."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        found = self.find_samples()
        split = found if isinstance(found, SampleSplit) else SampleSplit(*found)
        if split.validation is None:
            kept, held_out = split_holdout(len(split.normals), self.val_ratio, self.seed)
            fit_normals = [split.normals[i] for i in kept]
            validation = [split.normals[i] for i in held_out]
        else:
            fit_normals, validation = split.normals, split.validation
        anomalies = self._labelled_anomalies(split.anomaly_pool, len(fit_normals))
        train_transform = self._transform(self.train_augmentations)
        eval_transform = self._transform([])
        view_transform = self._transform(self.view_augmentations) if self.train_views else None
        self.train_set = AnomalyDataset(fit_normals + anomalies, train_transform, self.has_masks, self.seed,
                                        self.train_views, view_transform)
        self.normal_set = AnomalyDataset(fit_normals, eval_transform, self.has_masks)
        self.val_set = AnomalyDataset(validation, eval_transform, self.has_masks)
        self.test_set = AnomalyDataset(split.test, eval_transform, self.has_masks)

    def _labelled_anomalies(self, pool: list[Sample], n_normal: int) -> list[Sample]:
        if self.anomaly_ratio == 0:
            return []
        if not pool:
            raise ConfigError(
                f"data.anomaly_ratio={self.anomaly_ratio} needs labelled anomalies for training, and "
                f"{self.dataset_name or type(self).__name__}/{self.category} has none: use a one-vs-all or "
                "WMCA dataset, or anomaly_ratio=0"
            )
        return draw_labelled_anomalies(pool, labelled_anomaly_count(n_normal, self.anomaly_ratio), self.sample_seed)

    def _transform(self, augmentations: list[A.BasicTransform]) -> A.Compose:
        return build_transform(self.resize_size, self.crop_size, augmentations, self.mean, self.std, self.channels)

    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for a dataloader")

    def _loader(self, dataset: Dataset, batch_size: int, sampler: DistributedSampler) -> DataLoader:
        self._require_setup()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=Batch.collate,
        )

    def _devices(self) -> tuple[int, int]:
        """(rank, world size) of the attached Trainer; (0, 1) without one."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from `seed`; under DDP each device takes `batch_size` images of its share."""
        rank, world_size = self._devices()
        sampler = EpochSampler(self.train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed)
        return self._loader(self.train_set, self.batch_size, sampler)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        rank, world_size = self._devices()
        return self._loader(dataset, self.eval_batch_size, ShardSampler(dataset, world_size, rank))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def normal_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The training normals (holdout excluded) with the eval transform, in order; this rank's shard
        is every `world_size`-th image from `rank`, so the shards cover the set exactly once."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self._require_setup()
        return self._loader(self.normal_set, self.eval_batch_size, ShardSampler(self.normal_set, world_size, rank))
