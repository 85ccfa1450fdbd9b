"""data.cache: batches equal the uncached ones in every mode; disk caches are keyed by their sources and
size, rebuilt when truncated, built once when two processes ask at the same time, never left half-written."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from anomaly_lab.data import MVTecDataModule
from anomaly_lab.data import cache as cache_module
from anomaly_lab.data.cache import build_on_disk, decode, is_complete
from anomaly_lab.data.mvtec import mvtec_samples
from anomaly_lab.errors import ConfigError
from tests.conftest import normal_image, write_rgb

AUGMENTATIONS = [A.RandomResizedCrop(size=(16, 16), scale=(0.5, 1.0)), A.HorizontalFlip(p=0.5),
                 A.ColorJitter(p=1.0)]


def datamodule(root: Path, cache: str, cache_dir: Path, **kwargs) -> MVTecDataModule:
    kwargs = {"category": "widget", "image_size": [20, 24], "batch_size": 4, "seed": 3,
              "train_augmentations": AUGMENTATIONS, **kwargs}
    dm = MVTecDataModule(str(root), cache=cache, cache_dir=str(cache_dir), **kwargs)
    dm.setup("fit")
    return dm


def batches(dm: MVTecDataModule) -> list:
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.normal_dataloader()]
    return [batch for loader in loaders for batch in loader]


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.path == b.path
        torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
        torch.testing.assert_close(a.mask, b.mask, rtol=0, atol=0)
        assert torch.equal(torch.as_tensor(a.original_size), torch.as_tensor(b.original_size))


def cache_folders(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.is_dir())


@pytest.mark.parametrize("channels", [3, 1])
def test_memory_and_disk_batches_equal_the_uncached_ones(make_mvtec_tree, tmp_path, channels):
    root = make_mvtec_tree(n_train=9)
    expected = batches(datamodule(root, "none", tmp_path / "cache", channels=channels))
    assert_same_batches(batches(datamodule(root, "memory", tmp_path / "cache", channels=channels)), expected)
    assert_same_batches(batches(datamodule(root, "disk", tmp_path / "cache", channels=channels)), expected)
    # normals and test, each with its images, masks (test only), row map and original sizes
    assert [p.name.split("-")[2] for p in cache_folders(tmp_path / "cache")] == ["normals", "test"]
    assert_same_batches(batches(datamodule(root, "disk", tmp_path / "cache", channels=channels)), expected)


def test_rgb_is_cached_once_for_both_channel_settings(make_mvtec_tree, tmp_path):
    root = make_mvtec_tree()
    datamodule(root, "disk", tmp_path / "cache", channels=3)
    first = cache_folders(tmp_path / "cache")
    datamodule(root, "disk", tmp_path / "cache", channels=1)
    assert cache_folders(tmp_path / "cache") == first


def test_a_changed_source_file_or_size_gives_a_new_cache_with_the_new_content(make_mvtec_tree, tmp_path):
    root = make_mvtec_tree()
    cache_dir = tmp_path / "cache"
    datamodule(root, "disk", cache_dir)
    before = cache_folders(cache_dir)
    changed = root / "widget" / "train" / "good" / "000.png"
    write_rgb(changed, 255 - normal_image(0))
    os.utime(changed, ns=(10**18, 10**18))  # a new modification time whatever the clock's resolution
    after = batches(datamodule(root, "disk", cache_dir))
    assert_same_batches(after, batches(datamodule(root, "none", cache_dir)))
    new = [p for p in cache_folders(cache_dir) if p not in before]
    assert [p.name.split("-")[2] for p in new] == ["normals"]  # the test images did not change
    datamodule(root, "disk", cache_dir, image_size=[16, 16])
    assert len(cache_folders(cache_dir)) == len(before) + 3  # both groups again at the other size


def test_a_truncated_cache_is_rebuilt_never_read(make_mvtec_tree, tmp_path):
    root = make_mvtec_tree()
    expected = batches(datamodule(root, "none", tmp_path / "cache"))
    count = len(datamodule(root, "disk", tmp_path / "cache").test_set)
    folder = next(p for p in cache_folders(tmp_path / "cache") if "-test-" in p.name)
    images = folder / "images.npy"
    size = images.stat().st_size
    with open(images, "r+b") as file:
        file.truncate(size - 100)
    assert not is_complete(folder, count)
    assert_same_batches(batches(datamodule(root, "disk", tmp_path / "cache")), expected)
    assert images.stat().st_size == size and is_complete(folder, count)


def _build(folder: str, root: str, start, results) -> None:
    samples = mvtec_samples(Path(root) / "widget")[1]
    start.wait()
    build_on_disk(Path(folder), samples, (20, 24), True)
    results.put(os.getpid())


def test_two_processes_building_one_cache_at_once_both_end_with_the_whole_cache(make_mvtec_tree, tmp_path):
    root = make_mvtec_tree()
    folder = tmp_path / "cache" / "widget-test-key"
    folder.parent.mkdir()
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_build, args=(str(folder), str(root), start, results)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0]
    assert results.qsize() == 2
    samples = mvtec_samples(root / "widget")[1]
    assert is_complete(folder, len(samples))
    expected = decode(samples, (20, 24), True)
    for name, array in expected.items():
        np.testing.assert_array_equal(np.load(folder / f"{name}.npy"), array)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["widget-test-key", "widget-test-key.lock"]


def test_a_failed_build_leaves_no_cache_folder(make_mvtec_tree, tmp_path, monkeypatch):
    root = make_mvtec_tree()
    calls = []

    def failing(sample, with_mask):
        calls.append(sample)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of the build
        return original(sample, with_mask)

    original = cache_module.load_sample
    monkeypatch.setattr(cache_module, "load_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        datamodule(root, "disk", tmp_path / "cache")
    assert cache_folders(tmp_path / "cache") == []


def test_bad_cache_options_are_config_errors(make_mvtec_tree, tmp_path):
    root = make_mvtec_tree()
    with pytest.raises(ConfigError, match="data.cache='fast' must be one of none, memory, disk"):
        MVTecDataModule(str(root), "widget", cache="fast")
    with pytest.raises(ConfigError, match="data.cache=disk needs data.cache_dir"):
        MVTecDataModule(str(root), "widget", cache="disk")
