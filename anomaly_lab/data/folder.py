"""Your own images: a folder of normal images, optional folders of abnormal ones (one defect type each),
optional masks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_info

from anomaly_lab.data.datamodule import AnomalyDataModule, SampleSplit, split_holdout
from anomaly_lab.data.dataset import IMAGE_EXTENSIONS, Sample
from anomaly_lab.errors import ConfigError, DataError

DEFAULT_NORMAL_TEST_RATIO = 0.2
FOLDER_LAYOUT = (
    "<root>/<normal_dir>/**/*.<ext> (training normals), <root>/<abnormal dir>/**/*.<ext> (one defect type per "
    "folder), optional <root>/<mask_dir>/<abnormal dir name>/**/<stem><suffix>.<ext> or "
    "<root>/<mask_dir>/<stem><suffix>.<ext>"
)


def as_tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    """A list option given as one string or a list (Hydra: `x` or `[x,y]`) as a tuple of strings."""
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def find_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """The files under `folder` (recursively, not into linked folders) with one of `extensions` (lowercase,
    e.g. ``.png``) in any case, sorted; files and folders whose names start with '.' are left out."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in extensions]
    return sorted(found)


class FolderDataModule(AnomalyDataModule):
    """A user's own images: `normal_dir` trains; each of `abnormal_dirs` is a defect type (named after
    the folder) of the test set. Folders are relative to `root` (or absolute) and read recursively, with
    hidden files and folders left out; images are the files with one of `extensions` (any case).

    Normal test images: `normal_test_dir`, or `normal_test_ratio` of `normal_dir` carved out with
    `split_seed` and never trained on (default 0.2 without `normal_test_dir`). The validation holdout
    (`val_ratio`) comes from the remaining normals.

    Masks (optional, `mask_dir`): the mask of abnormal image `<stem>.<ext>` of folder `<name>` is
    `<mask_dir>/<name>/**/<stem><suffix>.<any image ext>` when `<mask_dir>/<name>/` exists, else
    `<mask_dir>/<stem><suffix>.<any image ext>`, with the first of `mask_suffix` that matches. With
    masks, every abnormal image needs one; `pixel_metrics=False` ignores them. Without masks the
    run reports image metrics only.

    `category` (reports, sweeps) defaults to the name of `root`. Other arguments: see AnomalyDataModule.
    """

    dataset_name = "folder"

    def __init__(
        self,
        root: str,
        normal_dir: str,
        abnormal_dirs: str | Sequence[str] = (),
        mask_dir: str | None = None,
        mask_suffix: str | Sequence[str] = ("", "_mask"),
        normal_test_dir: str | None = None,
        normal_test_ratio: float | None = None,
        pixel_metrics: bool = True,
        extensions: str | Sequence[str] = IMAGE_EXTENSIONS,
        category: str | None = None,
        **kwargs,
    ):
        super().__init__(root, category or Path(root).expanduser().resolve().name, **kwargs)
        if normal_test_ratio is not None and not 0 < normal_test_ratio < 1:
            raise ConfigError(f"data.normal_test_ratio={normal_test_ratio} must be in (0, 1), or null")
        if normal_test_ratio is not None and normal_test_dir is not None:
            raise ConfigError(
                f"data.normal_test_dir={normal_test_dir} and data.normal_test_ratio={normal_test_ratio} are both "
                "set: normal test images come either from their own folder or from normal_dir; set one to null"
            )
        self.extensions = tuple("." + e.lower().lstrip(".") for e in as_tuple(extensions))
        if not self.extensions or "." in self.extensions:
            raise ConfigError(f"data.extensions={list(as_tuple(extensions))} must list file extensions, e.g. [.png,.jpg]")
        self.normal_dir = normal_dir
        self.abnormal_dirs = as_tuple(abnormal_dirs)
        self.mask_dir = mask_dir
        self.mask_suffix = as_tuple(mask_suffix)
        self.normal_test_dir = normal_test_dir
        self.normal_test_ratio = DEFAULT_NORMAL_TEST_RATIO if normal_test_ratio is None else normal_test_ratio
        self.pixel_metrics = pixel_metrics
        self.has_masks = mask_dir is not None and pixel_metrics

    def find_samples(self) -> SampleSplit:
        if not self.root.is_dir():
            raise DataError(f"data.root={self.root} is not a folder (expected {FOLDER_LAYOUT})")
        if not self.abnormal_dirs:
            raise ConfigError(
                "data.abnormal_dirs is empty: the test set would hold normal images only, and image AUROC, AP "
                "and F1 need abnormal ones too; list the folders of abnormal images, e.g. "
                "data.abnormal_dirs=[scratch,dent] (relative to data.root)"
            )
        normals = self._images("data.normal_dir", self.normal_dir)
        abnormal = {f"data.abnormal_dirs[{i}]": self._images(f"data.abnormal_dirs[{i}]", d)
                    for i, d in enumerate(self.abnormal_dirs)}
        sources = {"data.normal_dir": normals, **abnormal}
        if self.normal_test_dir is None:
            if len(normals) < 2:
                raise DataError(
                    f"data.normal_test_ratio: {self._folder(self.normal_dir)} holds {len(normals)} image(s), and "
                    "carving normal test images out of it needs at least 2; add normals, or set data.normal_test_dir"
                )
            kept, carved = split_holdout(len(normals), self.normal_test_ratio, self.split_seed)
            normal_test = [normals[i] for i in carved]
            normals = [normals[i] for i in kept]
        else:
            normal_test = self._images("data.normal_test_dir", self.normal_test_dir)
            sources["data.normal_test_dir"] = normal_test
        masks = self._mask_files() if self.has_masks else []
        sources["data.mask_dir"] = masks
        check_disjoint(sources)
        test = [Sample(p, 0) for p in normal_test]
        for images, folder in zip(abnormal.values(), self.abnormal_dirs, strict=True):
            defect = Path(folder).name
            found = self._match_masks(defect, images, masks) if self.has_masks else {}
            test += [Sample(p, 1, found.get(p), defect=defect) for p in images]
        check_one_image_per_mask(test)
        rank_zero_info(f"data: {len(normals)} training normals, {len(normal_test)} normal and "
                       f"{len(test) - len(normal_test)} abnormal test images; {self._masks_note()}")
        return SampleSplit([Sample(p, 0) for p in normals], test)

    def _folder(self, folder: str) -> Path:
        return self.root / Path(folder).expanduser()

    def _images(self, option: str, folder: str) -> list[Path]:
        path = self._folder(folder)
        if not path.is_dir():
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise DataError(
                f"{option}={folder}: folder {path} does not exist (relative paths are taken from data.root); "
                f"folders in {self.root}: {', '.join(found) or 'none'}"
            )
        images = find_images(path, self.extensions)
        if not images:
            others = sorted({p.suffix.lower() for p in path.rglob("*") if p.is_file() and p.suffix})
            raise DataError(
                f"{option}={folder}: no images with extensions {', '.join(self.extensions)} in {path} "
                f"(searched recursively, hidden files skipped); other extensions found: {', '.join(others) or 'none'} "
                "(data.extensions sets the list)"
            )
        return images

    def _mask_files(self) -> list[Path]:
        """Every image file under `mask_dir`."""
        path = self._folder(self.mask_dir)
        if not path.is_dir():
            raise DataError(f"data.mask_dir={self.mask_dir}: folder {path} does not exist (expected {FOLDER_LAYOUT})")
        return find_images(path, tuple(dict.fromkeys((*IMAGE_EXTENSIONS, *self.extensions))))

    def _match_masks(self, defect: str, images: list[Path], masks: list[Path]) -> dict[Path, Path]:
        """The mask of each of `images` (see the class docstring); DataError if one lacks a mask or is ambiguous."""
        mask_root = self._folder(self.mask_dir)
        scope = mask_root / defect
        if scope.is_dir():
            candidates = [m for m in masks if scope in m.parents]
        else:
            scope, candidates = mask_root, [m for m in masks if m.parent == mask_root]
        by_stem: dict[str, list[Path]] = {}
        for mask in candidates:
            by_stem.setdefault(mask.stem, []).append(mask)
        found, missing = {}, []
        for image in images:
            matches = next((by_stem[image.stem + s] for s in self.mask_suffix if image.stem + s in by_stem), None)
            if matches is None:
                missing.append(image)
            elif len(matches) > 1:
                raise DataError(f"abnormal image {image} matches {len(matches)} masks: {', '.join(map(str, matches))}; "
                                "masks are matched by file stem, so each must have its own")
            else:
                found[image] = matches[0]
        if missing:
            expected = " or ".join(f"{scope}/{missing[0].stem}{s}.<ext>" for s in self.mask_suffix)
            raise DataError(
                f"{len(missing)} of the {len(images)} abnormal images of {defect} have no mask, e.g. {missing[0]} "
                f"(expected {expected}); add the masks, or set data.pixel_metrics=false for image metrics only"
            )
        return found

    def _masks_note(self) -> str:
        if self.has_masks:
            return f"masks from {self._folder(self.mask_dir)}: image and pixel metrics"
        reason = "data.mask_dir is not set" if self.mask_dir is None else "data.pixel_metrics=false: masks ignored"
        return f"no masks ({reason}): the run reports image metrics only"


def check_disjoint(sources: dict[str, list[Path]]) -> None:
    """DataError if one file lies in two of the folders `sources` lists (option -> its files)."""
    seen: dict[Path, str] = {}
    for option, files in sources.items():
        for file in files:
            first = seen.setdefault(file.resolve(), option)
            if first != option:
                raise DataError(f"{file} is found by both {first} and {option}: each image belongs to one folder "
                                "(normal, one abnormal type, or masks); move it, or point the options at disjoint folders")


def check_one_image_per_mask(samples: list[Sample]) -> None:
    """DataError if two of `samples` have the same mask file."""
    owner: dict[Path, Path] = {}
    for sample in samples:
        if sample.mask_path is None:
            continue
        first = owner.setdefault(sample.mask_path, sample.image_path)
        if first != sample.image_path:
            raise DataError(
                f"mask {sample.mask_path} matches two abnormal images, {first} and {sample.image_path}: masks are "
                "matched by file stem, so rename one, or give each abnormal folder its masks in <mask_dir>/<its name>/"
            )
