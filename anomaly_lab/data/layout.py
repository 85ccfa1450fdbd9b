"""Checks of a dataset's folder layout that fail with one message naming the path and the expected layout."""

from __future__ import annotations

from pathlib import Path

from anomaly_lab.data.dataset import IMAGE_EXTENSIONS, list_images
from anomaly_lab.errors import DataError


def check_category_dir(
    root: Path, category: str, dataset: str, url: str, layout: str, subfolder: str
) -> Path:
    """`root/category`, or a DataError saying where to get the dataset or which categories exist.

    `subfolder` is the dataset's folder name under `paths.data_root` (e.g. mvtec).
    """
    if not root.is_dir():
        raise DataError(
            f"{dataset} not found: {root} does not exist. Download {dataset} from {url} and extract it "
            f"so that its layout is {layout}; then set data.root=<that folder>, or "
            f"paths.data_root=<a folder holding it as {subfolder}/>."
        )
    category_dir = root / category
    if not category_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError(
            f"{dataset} category folder {category_dir} does not exist (expected {layout}); "
            f"categories found in {root}: {', '.join(found) or 'none'}"
        )
    return category_dir


def require_images(folder: Path, layout: str) -> list[Path]:
    """The images in `folder`, which must exist and hold at least one."""
    if not folder.is_dir():
        raise DataError(f"folder {folder} does not exist (expected {layout})")
    images = list_images(folder)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder} (expected {layout})")
    return images


def require_subdirs(folder: Path, layout: str) -> list[Path]:
    """The subfolders of `folder`, sorted; `folder` must exist and hold at least one."""
    subdirs = (
        sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if folder.is_dir()
        else []
    )
    if not subdirs:
        raise DataError(f"no subfolders in {folder} (expected {layout})")
    return subdirs


def mask_index(mask_dir: Path) -> dict[str, Path]:
    """The image files of `mask_dir` (empty if it does not exist) by file stem."""
    return {p.stem: p for p in list_images(mask_dir)} if mask_dir.is_dir() else {}


def find_mask(masks: dict[str, Path], mask_dir: Path, image: Path, suffixes: tuple[str, ...]) -> Path:
    """The mask of `image` among `masks` (from `mask_index(mask_dir)`): stem <image stem><suffix>."""
    for suffix in suffixes:
        if image.stem + suffix in masks:
            return masks[image.stem + suffix]
    expected = " or ".join(str(mask_dir / f"{image.stem}{suffix}.png") for suffix in suffixes)
    raise DataError(f"no mask for defect image {image}: expected {expected}")
