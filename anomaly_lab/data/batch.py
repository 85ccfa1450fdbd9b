"""The one batch type every datamodule yields and every model consumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    """A batch of images with their ground truth.

    image: float [B, C, H, W], normalised.
    label: long [B], 0 normal, 1 anomalous.
    mask: float [B, 1, H, W] with 1 = anomalous pixel, or None for datasets without pixel ground truth.
    path: the source file of each image (or a dataset-specific identifier).
    target: long [B] class index for one-vs-all datasets, else None.
    views: float [B, V, C, H, W], V augmented views of each image for contrastive training (the training
        loader of a datamodule built with `train_views` = V > 0), else None.
    defect: the defect type of each image (its test folder's name, e.g. ``scratch``), None for normal
        images and datasets without defect types; per-defect metrics group by it.
    mask_path: each image's mask file (None: no anomalous pixel), for evaluation at the masks' own resolution.
    original_size: long [B, 2], each source image's (height, width) before resizing, or None.

    Lightning moves dataclasses to the device field by field, so no ``to`` method is needed.
    """

    image: Tensor
    label: Tensor
    mask: Tensor | None = None
    path: list[str] = field(default_factory=list)
    target: Tensor | None = None
    views: Tensor | None = None
    defect: list[str | None] = field(default_factory=list)
    mask_path: list[str | None] = field(default_factory=list)
    original_size: Tensor | None = None

    def __len__(self) -> int:
        return self.image.shape[0]

    def pin_memory(self) -> Batch:
        """The batch with its tensors in page-locked memory (what a DataLoader with pin_memory=True calls)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})

    @staticmethod
    def collate(samples: list[dict]) -> Batch:
        """Stack per-sample dicts (keys: image, label, path, optional mask, target, views, defect, mask_path,
        original_size) into a Batch."""
        masks = [s.get("mask") for s in samples]
        if any(m is None for m in masks) and not all(m is None for m in masks):
            raise ValueError("a batch mixes samples with and without masks")
        targets = [s.get("target") for s in samples]
        return Batch(
            image=torch.stack([s["image"] for s in samples]),
            label=torch.as_tensor([int(s["label"]) for s in samples], dtype=torch.long),
            mask=None if masks[0] is None else torch.stack(masks).float(),
            path=[str(s["path"]) for s in samples],
            target=None if targets[0] is None else torch.as_tensor(targets, dtype=torch.long),
            views=torch.stack([s["views"] for s in samples]) if "views" in samples[0] else None,
            defect=[s.get("defect") for s in samples],
            mask_path=[s.get("mask_path") for s in samples],
            original_size=torch.as_tensor([s["original_size"] for s in samples], dtype=torch.long)
            if "original_size" in samples[0] else None,
        )
