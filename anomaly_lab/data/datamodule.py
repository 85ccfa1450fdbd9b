"""The datamodule base: normal training images (plus, optionally, labelled anomalies), a held-out
normal validation split, a labelled test set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from anomaly_lab.data.batch import Batch
from anomaly_lab.data.cache import check_mode as check_cache_mode
from anomaly_lab.data.cache import decode_groups
from anomaly_lab.data.dataset import AnomalyDataset, Sample
from anomaly_lab.data.prescan import EMPTY_MASK_POLICIES, check_both_classes, scan_samples
from anomaly_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, as_size, build_transform, channel_stats
from anomaly_lab.errors import ConfigError, DataError


def split_holdout(count: int, val_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, held out) of `count` items, drawn with `seed`: nothing held out when `val_ratio`
    is 0, else round(val_ratio * count) items, at least 1 and at most count - 1."""
    if val_ratio == 0:
        return list(range(count)), []
    if count < 2:
        raise DataError(
            f"need at least 2 training images to hold one out for validation, found {count}: "
            "set data.val_ratio=0 to train on every normal"
        )
    n_holdout = min(max(1, round(val_ratio * count)), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_holdout:]), sorted(order[:n_holdout])


def labelled_anomaly_count(n_normal: int, ratio: float) -> int:
    """How many labelled anomalies make the fraction `ratio` (gamma) of a training set holding `n_normal`
    normals: round(ratio / (1 - ratio) * n_normal), so that anomalies / (normals + anomalies) ~ ratio,
    and at least 1 when ratio > 0 (CUB's 50 normals a class at gamma = 0.01 would round to none)."""
    count = round(ratio / (1 - ratio) * n_normal)
    return max(count, 1) if ratio > 0 and n_normal > 0 else count


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

    Train: the training normals minus a validation holdout (`val_ratio` of them, at least one, drawn
    with `split_seed`, which is fixed by default so that a sweep over the run's `seed` keeps one split),
    with `train_augmentations`. Validation: the holdout (or the subclass's own validation normals);
    with `val_ratio=0` every normal trains and validation scores the training normals themselves, so
    thresholds still come from normal images only (they run lower than an unseen normal's score: a
    threshold from these is a lower bound). `threshold_source` names the source and setup logs it.
    Test and predict: the test set. Every loader yields :class:`Batch`.

    Setup checks the data before any training (`anomaly_lab.data.prescan`): every image file's header
    and completeness, each mask's size against its image's, empty masks of anomalous images
    (`empty_masks`: error or warn), a test set holding both classes, and at least one validation, test
    and normal image per device.

    Semi-supervised setting: with `anomaly_ratio` (gamma) > 0, labelled anomalies (label 1 in the
    Batch) drawn from the subclass's anomaly pool with `sample_seed` (default: `seed`) join the
    training loader, as the fraction gamma of it (see `labelled_anomaly_count`). They never join the
    validation holdout (thresholds come from normal images only) nor `normal_dataloader` (statistics of
    normal data). gamma = 0 is the one-class setting.

    Contrastive views: with `train_views` = V > 0, every training Batch also carries `views`
    [B, V, C, H, W], V independent draws of resize -> `view_augmentations` -> normalise on each image
    (e.g. SimCLR's two views), seeded per image and epoch as the training augmentations are.
    Validation, test and normal loaders have no views.

    Decoding (`anomaly_lab.data.cache`): `cache` = none decodes each image file at every access;
    memory decodes every image once per run; disk once into memory-mapped files under `cache_dir`
    shared by later runs, workers and ranks. Batches are the same in every mode.

    Loaders: `num_workers` persistent worker processes, each `prefetch_factor` batches ahead (None:
    torch's 2), `pin_memory` for fast copies to a GPU (trainer=gpu and trainer=ddp set both).

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
        split_seed: int = 0,
        train_augmentations: Sequence[A.BasicTransform] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channels: int = 3,
        anomaly_ratio: float = 0.0,
        sample_seed: int | None = None,
        train_views: int = 0,
        view_augmentations: Sequence[A.BasicTransform] | None = None,
        empty_masks: str = "error",
        cache: str = "none",
        cache_dir: str | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        super().__init__()
        self.cache = check_cache_mode(cache)
        if cache == "disk" and cache_dir is None:
            raise ConfigError("data.cache=disk needs data.cache_dir (a folder for the cache files)")
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        if empty_masks not in EMPTY_MASK_POLICIES:
            raise ConfigError(f"data.empty_masks={empty_masks!r} must be one of {', '.join(EMPTY_MASK_POLICIES)}")
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
        if self.crop_size is not None and any(c > r for c, r in zip(self.crop_size, self.resize_size, strict=True)):
            raise ConfigError(
                f"data.crop_size={list(self.crop_size)} is larger than data.image_size={list(self.resize_size)}: "
                "the centre crop is taken from the resized image, so it must fit inside it"
            )
        self.image_size = self.crop_size or self.resize_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.val_ratio = val_ratio
        self.seed = seed
        self.split_seed = split_seed
        self.empty_masks = empty_masks
        self.threshold_source: str | None = None
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
        if split.validation is not None:
            fit_normals, validation = split.normals, split.validation
            self.threshold_source = f"the dataset's {len(validation)} validation normals"
        elif self.val_ratio == 0:
            fit_normals = validation = split.normals
            self.threshold_source = (
                f"the {len(validation)} training normals' own scores (data.val_ratio=0: every normal trains)"
            )
        else:
            kept, held_out = split_holdout(len(split.normals), self.val_ratio, self.split_seed)
            fit_normals = [split.normals[i] for i in kept]
            validation = [split.normals[i] for i in held_out]
            self.threshold_source = (
                f"a holdout of {len(validation)} of the {len(split.normals)} training normals "
                f"(data.val_ratio={self.val_ratio}, data.split_seed={self.split_seed})"
            )
        anomalies = self._labelled_anomalies(split.anomaly_pool, len(fit_normals))
        self._check(fit_normals, validation, split.test, anomalies)
        decoded = decode_groups(
            self.cache, {"normals": split.normals, "validation": split.validation or [], "test": split.test,
                         "anomalies": anomalies},
            self.resize_size, self.has_masks, self.cache_dir, f"{self.dataset_name or type(self).__name__}-{self.category}")
        train_transform = self._transform(self.train_augmentations)
        eval_transform = self._transform([])
        view_transform = self._transform(self.view_augmentations) if self.train_views else None
        self.train_set = AnomalyDataset(fit_normals + anomalies, train_transform, self.has_masks, self.seed,
                                        self.train_views, view_transform, decoded)
        self.normal_set = AnomalyDataset(fit_normals, eval_transform, self.has_masks, decoded=decoded)
        self.val_set = AnomalyDataset(validation, eval_transform, self.has_masks, decoded=decoded)
        self.test_set = AnomalyDataset(split.test, eval_transform, self.has_masks, decoded=decoded)
        rank_zero_info(f"thresholds: from {self.threshold_source}")

    def _check(self, fit_normals: list[Sample], validation: list[Sample], test: list[Sample],
               anomalies: list[Sample]) -> None:
        """Stop before training on anything that would fail or mislead later (see the class docstring)."""
        name = f"{self.dataset_name or type(self).__name__}/{self.category}"
        check_both_classes([sample.label for sample in test], f"the test set of {name}")
        _, world_size = self._devices()
        for role, samples in (("validation", validation), ("test", test), ("training normal", fit_normals)):
            if len(samples) < world_size:
                raise DataError(
                    f"{name} has {len(samples)} {role} image(s) for {world_size} devices: every device needs at "
                    "least one (a device without images skips its loop and the others wait for it until the "
                    "DDP timeout); raise data.val_ratio, or set data.val_ratio=0, or use fewer devices"
                )
        scan_samples(fit_normals + validation + test + anomalies, self.has_masks, self.empty_masks)

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
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
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
