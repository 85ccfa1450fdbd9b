"""Every config in conf/ composes, and what it names can be instantiated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from anomaly_lab.models import AnomalyModel
from tests.helpers import CONF, compose_config


def options(group: str) -> list[str]:
    """Every option of a config group, e.g. 'mvtec/bottle', skipping shared base files (leading underscore)."""
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if not any(part.startswith("_") for part in p.relative_to(root).parts))


def test_every_mvtec_category_and_btad_split_has_a_config():
    assert len([o for o in options("data") if o.startswith("mvtec/")]) == 15
    assert [o for o in options("data") if o.startswith("btad/")] == ["btad/01", "btad/02", "btad/03"]


@pytest.mark.parametrize("data", options("data"))
def test_data_configs_instantiate(data, tmp_path):
    root = [f"data.root={tmp_path}/folder"] if data == "folder" else []  # a user's own folder has no default
    cfg = compose_config("train", [f"data={data}", f"paths.data_root={tmp_path}", *root], output_dir=tmp_path)
    datamodule = instantiate(cfg.data)
    assert datamodule.category == Path(data).name
    assert str(tmp_path) in str(datamodule.root)


@pytest.mark.parametrize("model", options("model"))
def test_model_configs_instantiate(model, tmp_path):
    cfg = compose_config("train", [f"model={model}"], output_dir=tmp_path)
    assert isinstance(instantiate(cfg.model), AnomalyModel)


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_configs_compose_and_cpu_ones_instantiate(trainer, tmp_path):
    cfg = compose_config("train", [f"trainer={trainer}"], output_dir=tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert cfg.trainer.devices >= 1  # composes; a GPU is needed to build it
        return
    built = instantiate(cfg.trainer, logger=False)
    assert built.num_devices == cfg.trainer.devices


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_configs_instantiate_offline(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train", [f"logger={logger}"], output_dir=tmp_path)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert loggers and all(str(tmp_path) in str(lg.save_dir) for lg in loggers)


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callback_configs_instantiate(callbacks, tmp_path):
    cfg = compose_config("train", [f"callbacks={callbacks}"], output_dir=tmp_path)
    built = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    assert len(built) == len(cfg.callbacks or {})
    assert instantiate(cfg.evaluator) is not None


def test_eval_config_composes(tmp_path):
    cfg = compose_config("eval", ["ckpt_path=x.ckpt"], output_dir=tmp_path)
    assert cfg.ckpt_path == "x.ckpt" and cfg.task_name == "eval"
