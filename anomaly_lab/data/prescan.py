"""Checks of a dataset's files before any training, from headers and file ends instead of full decodes.

What it catches, each with one message naming the file: an unreadable or corrupt image (its header),
a truncated PNG or JPEG (no end marker in its last bytes), a mask whose size differs from its image's,
and an anomalous image whose mask marks no pixel. Only those masks are decoded (to see that they are
not empty); images are decoded only in formats without an end marker (BMP, TIFF, ...), which have no
cheaper completeness check.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from anomaly_lab.data.dataset import Sample, check_mask_size, read_mask
from anomaly_lab.errors import DataError

log = logging.getLogger(__name__)

EMPTY_MASK_POLICIES = ("error", "warn")
TAIL_BYTES = 1024
# The marker each format's complete file ends with (within its last TAIL_BYTES: writers may append).
END_MARKERS = {"PNG": b"IEND", "JPEG": b"\xff\xd9"}


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header; DataError if it is not a complete image."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            marker = END_MARKERS.get(image.format)
            if marker is None:
                image.load()  # no end marker to look for: decode to see that the file is whole
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    if marker is not None and marker not in _tail(path):
        raise DataError(f"image {path} is truncated: its {image.format} end marker is missing")
    return height, width


def _tail(path: Path) -> bytes:
    with open(path, "rb") as file:
        file.seek(0, 2)
        file.seek(max(0, file.tell() - TAIL_BYTES))
        return file.read()


def scan_samples(samples: Sequence[Sample], with_masks: bool, empty_masks: str = "error") -> None:
    """Check every file-backed image of `samples` and, with `with_masks`, every mask (see the module)."""
    empty: list[Path] = []
    for sample in samples:
        if sample.pixels is not None:  # decoded in memory already (e.g. a CIFAR pickle)
            continue
        size = image_size(sample.image_path)
        if not with_masks or sample.mask_path is None:
            continue
        if sample.label == 1:  # decoded (it must not be empty), so its size and completeness come with it
            mask = read_mask(sample.mask_path)
            mask_size = mask.shape
            if not mask.any():
                empty.append(sample.mask_path)
        else:
            mask_size = image_size(sample.mask_path)
        check_mask_size(sample.mask_path, mask_size, sample.image_path, size)
    if empty:
        message = (
            f"{len(empty)} mask(s) of anomalous images mark no anomalous pixel, e.g. {empty[0]}: "
            "their pixels would all count as normal"
        )
        if empty_masks == "error":
            raise DataError(f"{message}; fix the masks, or set data.empty_masks=warn to go on")
        warnings.warn(message, stacklevel=2)
        log.warning(message)


def check_both_classes(labels: Sequence[int], what: str) -> None:
    """Stop unless `labels` hold both normal (0) and anomalous (1) images: AUROC needs both."""
    found = sorted({int(label) for label in labels})
    if found != [0, 1]:
        raise DataError(
            f"image AUROC, AP and F1 need both normal (label 0) and anomalous (label 1) images, but the "
            f"{len(labels)} images of {what} have only label(s) {found}"
        )
