"""The data configs: one file per MVTec category and BTAD product, shared keys land in `data`."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from anomaly_lab.data import BTAD_CATEGORIES, MVTEC_CATEGORIES, SyntheticDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"

pytestmark = pytest.mark.skipif(not (CONF / "train.yaml").is_file(), reason="conf/train.yaml not written yet")


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_category_folders_hold_exactly_the_categories():
    assert sorted(p.stem for p in (CONF / "data" / "mvtec").glob("*.yaml")) == sorted(MVTEC_CATEGORIES)
    assert sorted(p.stem for p in (CONF / "data" / "btad").glob("*.yaml")) == list(BTAD_CATEGORIES)


@pytest.mark.parametrize(
    ("data", "target", "category", "subfolder"),
    [("mvtec/screw", "MVTecDataModule", "screw", "mvtec"), ("btad/02", "BTADDataModule", "02", "btad")],
)
def test_shared_base_keys_land_in_data(tmp_path, data, target, category, subfolder):
    cfg = compose_train([f"data={data}", f"paths.data_root={tmp_path}", "seed=7"])
    assert cfg.data._target_ == f"anomaly_lab.data.{target}"
    assert (cfg.data.category, cfg.data.image_size, cfg.data.seed) == (category, 256, 7)
    assert cfg.data.root == str(tmp_path / subfolder) and cfg.data.train_augmentations is None
    assert "_base" not in cfg and "category" not in cfg


def test_data_root_can_be_set_alone_and_augmentations_come_from_config(tmp_path):
    cfg = compose_train(
        [
            "data=synthetic/object",
            f"data.root={tmp_path}",
            "data.train_augmentations=[{_target_: albumentations.HorizontalFlip, p: 0.5}]",
        ]
    )
    dm = instantiate(cfg.data)
    assert isinstance(dm, SyntheticDataModule) and dm.root == tmp_path and dm.category == "object"
    assert type(dm.train_augmentations[0]).__name__ == "HorizontalFlip"


@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_gpu_trainers_pin_memory_and_prefetch_in_every_loader(make_mvtec_tree, tmp_path, trainer):
    root = make_mvtec_tree()
    cfg = compose_train([f"trainer={trainer}", "data=mvtec/bottle", f"data.root={root}", "data.category=widget",
                         f"paths.data_root={tmp_path}"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.max_epochs == 1  # the default trainer's keys stay
    dm = instantiate(cfg.data)
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.normal_dataloader()):
        assert (loader.pin_memory, loader.prefetch_factor, loader.persistent_workers) == (True, 4, True)
    cpu = instantiate(compose_train(["data=mvtec/bottle", f"data.root={root}", "data.category=widget",
                                     f"paths.data_root={tmp_path}"]).data)
    cpu.setup()
    assert (cpu.test_dataloader().pin_memory, cpu.test_dataloader().prefetch_factor) == (False, 2)


@pytest.mark.parametrize(("data", "mode"), [("mvtec/bottle", "disk"), ("btad/01", "disk"), ("folder", "disk"),
                                            ("cub200", "disk"), ("wmca/pp", "disk"), ("synthetic/hard", "memory"),
                                            ("cifar10", "none")])
def test_each_dataset_has_its_cache_default(tmp_path, data, mode):
    cfg = compose_train([f"data={data}", f"paths.data_root={tmp_path}"])
    assert cfg.data.cache == mode and cfg.data.cache_dir == str(tmp_path / "cache")
