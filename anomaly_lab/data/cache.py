"""Decode once: a dataset's images resized to the size every transform starts from, kept as uint8.

`data.cache`: `none` decodes every image at every access; `memory` decodes each image once per run
into arrays of this process (loader workers share them on fork); `disk` writes them once into
memory-mapped files under `data.cache_dir`, read by every later run, loader worker and DDP rank.

Every pipeline starts with `Resize(image_size)`, so an image decoded, cropped to its box and resized
once gives, after the same Resize (then the identity), exactly the uncached batch; masks are resized
with the Resize's nearest interpolation and stored as 0/1. Images stay RGB whatever `data.channels`
is: the grey conversion comes after the augmentations, so one cache serves both.

A disk cache is one folder per group of samples (training normals, validation, test, labelled
anomalies), named by a key of everything its content depends on: each source file's path, size and
modification time (images, masks, the pickle behind in-memory images), crop boxes, the size and the
format version. A new key writes a new folder. The folder is written under a temporary name and
renamed when complete, under an exclusive lock on `<folder>.lock`: parallel jobs and DDP ranks wait
for the one that builds, and a killed build leaves only a temporary folder, never a partial cache.
A cache whose files do not have their recorded sizes (truncated) is rebuilt, never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import albumentations as A
import numpy as np

from anomaly_lab.data.dataset import Sample, load_sample
from anomaly_lab.errors import ConfigError

CACHE_MODES = ("none", "memory", "disk")
FORMAT_VERSION = 1
FILES = ("images.npy", "masks.npy", "mask_rows.npy", "sizes.npy")


class DecodedSamples:
    """Decoded samples by `Sample`: `read(sample)` -> (RGB uint8 [H, W, 3], 0/1 uint8 mask [H, W] or
    None, original (height, width)). Each group's arrays are in memory or in a cache folder; folders
    are opened lazily in each process, so that spawned loader workers map the files instead of copying them."""

    def __init__(self, groups: list[tuple[list[Sample], dict[str, np.ndarray] | Path]]):
        self._sources = [source for _, source in groups]
        self._where = {sample: (g, i) for g, (samples, _) in enumerate(groups) for i, sample in enumerate(samples)}
        self._mapped: dict[int, dict[str, np.ndarray]] = {}

    def read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
        group, index = self._where[sample]
        arrays = self._arrays(group)
        row = int(arrays["mask_rows"][index])
        mask = None if row < 0 else np.array(arrays["masks"][row])  # copies: transforms never touch the cache
        return np.array(arrays["images"][index]), mask, tuple(int(s) for s in arrays["sizes"][index])

    def _arrays(self, group: int) -> dict[str, np.ndarray]:
        source = self._sources[group]
        if isinstance(source, dict):
            return source
        if group not in self._mapped:
            self._mapped[group] = {name.removesuffix(".npy"): np.load(source / name, mmap_mode="r") for name in FILES}
        return self._mapped[group]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mapped": {}}


def check_mode(mode: str) -> str:
    if mode not in CACHE_MODES:
        raise ConfigError(f"data.cache={mode!r} must be one of {', '.join(CACHE_MODES)}")
    return mode


def decode_groups(mode: str, groups: dict[str, Sequence[Sample]], size: tuple[int, int], with_masks: bool,
                  cache_dir: Path | None, name: str) -> DecodedSamples | None:
    """The samples of each named group decoded at `size` (None for mode `none`); disk caches go to
    `cache_dir/<name>-<group>-<key>`."""
    if check_mode(mode) == "none":
        return None
    decoded = []
    for group, samples in groups.items():
        samples = list(dict.fromkeys(samples))
        if not samples:
            continue
        if mode == "memory":
            decoded.append((samples, decode(samples, size, with_masks)))
        else:
            folder = Path(cache_dir).expanduser() / f"{name}-{group}-{cache_key(samples, size, with_masks)}"
            decoded.append((samples, build_on_disk(folder, samples, size, with_masks)))
    return DecodedSamples(decoded)


def cache_key(samples: Sequence[Sample], size: tuple[int, int], with_masks: bool) -> str:
    """16 hex digits of a hash of everything a cache's content depends on (see the module docstring)."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, list(size), with_masks]).encode())
    for sample in samples:
        source = sample.image_path.parent if sample.pixels is not None else sample.image_path
        parts = [str(sample.image_path), _stat(source), sample.box]
        if with_masks:
            parts += [str(sample.mask_path), _stat(sample.mask_path)]
        digest.update(json.dumps(parts).encode())
    return digest.hexdigest()[:16]


def _stat(path: Path | None) -> list[int] | None:
    if path is None or not path.exists():
        return None
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def decode(samples: Sequence[Sample], size: tuple[int, int], with_masks: bool,
           folder: Path | None = None) -> dict[str, np.ndarray]:
    """Arrays of the samples resized to `size`, in memory or (with `folder`) as .npy files there:
    images [N, H, W, 3] uint8, masks [M, H, W] 0/1 uint8 of the M samples with a mask file, mask_rows [N]
    (a sample's row in masks, -1: none), sizes [N, 2] (the original height and width)."""
    has_mask = [with_masks and s.mask_path is not None for s in samples]
    rows = np.where(has_mask, np.cumsum(has_mask) - 1, -1)
    shapes = {"images": ((len(samples), *size, 3), np.uint8), "masks": ((sum(has_mask), *size), np.uint8),
              "mask_rows": ((len(samples),), np.int64), "sizes": ((len(samples), 2), np.int64)}
    if folder is None:
        arrays = {name: np.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}
    else:
        arrays = {name: np.lib.format.open_memmap(folder / f"{name}.npy", "w+", dtype, shape)
                  for name, (shape, dtype) in shapes.items()}
    arrays["mask_rows"][:] = rows
    resize = A.Resize(*size)

    def one(index: int) -> None:
        image, mask, original = load_sample(samples[index], has_mask[index])
        out = resize(image=image) if mask is None else resize(image=image, mask=mask)
        arrays["images"][index], arrays["sizes"][index] = out["image"], original
        if mask is not None:
            arrays["masks"][rows[index]] = out["mask"] > 0.5

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # OpenCV and PIL decode without the GIL
        list(pool.map(one, range(len(samples))))
    return arrays


def build_on_disk(folder: Path, samples: Sequence[Sample], size: tuple[int, int], with_masks: bool) -> Path:
    """`folder` holding the decoded samples: reused when complete, else (re)built atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.with_name(folder.name + ".lock")):
        if is_complete(folder, len(samples)):
            return folder
        if folder.exists():  # incomplete or truncated: moved away, then removed
            stale = folder.with_name(f"{folder.name}.stale-{uuid.uuid4().hex[:8]}")
            folder.rename(stale)
            shutil.rmtree(stale)
        partial = folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:8]}")
        partial.mkdir()
        try:
            arrays = decode(samples, size, with_masks, partial)
            for array in arrays.values():
                array.flush()
            del arrays
            record = {"count": len(samples), "bytes": {name: (partial / name).stat().st_size for name in FILES}}
            (partial / "complete.json").write_text(json.dumps(record))
            partial.rename(folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return folder


def is_complete(folder: Path, count: int) -> bool:
    """Whether `folder` holds a whole cache of `count` samples: its record, and every file at its size."""
    try:
        record = json.loads((folder / "complete.json").read_text())
        return record["count"] == count and all(
            (folder / name).stat().st_size == record["bytes"][name] for name in FILES
        )
    except (OSError, ValueError, KeyError):
        return False


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock across processes (released by the system if the holder dies)."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
