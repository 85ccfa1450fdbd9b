"""train(cfg) / evaluate(cfg): instantiate the configured parts, fit, validate, test, write results.

This is the only module that reads Hydra config objects; everything it builds takes plain arguments.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from anomaly_lab.callbacks import ResultsWriter, git_commit
from anomaly_lab.errors import AnomalyLabError, ConfigError
from anomaly_lab.models import AnomalyModel

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model (if it learns), fit its normal statistics, set thresholds on validation normals,
    save `checkpoints/last.ckpt`, test, and write `metrics.json` in the run folder."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    _save_config(cfg, output_dir / "config.yaml")
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    trainer, writer = _trainer(cfg, model, datamodule, output_dir)
    if model.needs_training:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    trainer.validate(model, datamodule=datamodule, verbose=False)
    trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt", weights_only=False)
    trainer.test(model, datamodule=datamodule, verbose=False)
    return _finish(cfg, trainer, writer)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Re-evaluate a checkpoint with the model and data of the run that wrote it."""
    ckpt_path = Path(cfg.ckpt_path)
    run_config = ckpt_path.parent.parent / "config.yaml"
    if not ckpt_path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint (expected <run>/checkpoints/last.ckpt)")
    if not run_config.is_file():
        raise ConfigError(f"{run_config} not found: ckpt_path must lie in <run>/checkpoints/ of a training run")
    run_cfg = OmegaConf.load(run_config)
    # The run's model, data, evaluator and callbacks (e.g. a method's own protocol) are kept.
    for key in ("paths", "trainer", "logger", "task_name", "ckpt_path", "hydra"):
        run_cfg.pop(key, None)
    OmegaConf.set_struct(cfg, False)  # the run's keys (model, data, seed, ...) join the eval config
    cfg = OmegaConf.merge(cfg, run_cfg, cfg.overrides)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    _save_config(cfg, output_dir / "config.yaml")
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    trainer, writer = _trainer(cfg, model, datamodule, output_dir)
    if not (model.image_threshold.isfinite() and (model.normal_fitted or not model.has_normal_statistics)):
        trainer.validate(model, datamodule=datamodule, verbose=False)
    trainer.test(model, datamodule=datamodule, verbose=False)
    return _finish(cfg, trainer, writer)


def entry_point(task):
    """Wrap a task for a Hydra main: a user error ends the run with its one-line message, exit status 1."""

    @functools.wraps(task)
    def run(cfg: DictConfig) -> float | None:
        try:
            metrics = task(cfg)
        except (AnomalyLabError, InstantiationException) as error:
            if isinstance(error, InstantiationException):  # raised in a constructor Hydra called
                if not isinstance(error.__cause__, AnomalyLabError):
                    raise
                error = error.__cause__
            message = user_message(error)
            log.error(message)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
        return metrics.get(cfg.optimized_metric.removeprefix("test/")) if cfg.get("optimized_metric") else None

    return run


def user_message(error: AnomalyLabError) -> str:
    """The error's own sentence, without the traceback a DataLoader worker prepends when it re-raises."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    return text.rstrip().splitlines()[-1].split(": ", 1)[-1]


def _trainer(cfg: DictConfig, model: AnomalyModel, datamodule, output_dir: Path) -> tuple[pl.Trainer, ResultsWriter]:
    writer = ResultsWriter(output_dir / "metrics.json", _metadata(cfg, model, datamodule))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += [instantiate(cfg.evaluator), writer]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **model.trainer_settings)
    hyperparameters = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams({k: hyperparameters.get(k) for k in ("model", "data", "trainer", "seed", "tags")})
    return trainer, writer


def _metadata(cfg: DictConfig, model: AnomalyModel, datamodule) -> dict[str, Any]:
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    return {
        "model": model.name,
        "data": getattr(datamodule, "dataset_name", type(datamodule).__name__),
        "category": getattr(datamodule, "category", None),
        # One-vs-all and semi-supervised runs of one dataset differ by these.
        **{key: getattr(datamodule, key) for key in ("normal_class", "anomaly_ratio", "sample_seed")
           if hasattr(datamodule, key)},
        "seed": cfg.seed,
        "config": {group: choices.get(group) for group in ("model", "data", "trainer", "experiment")},
        "git_commit": git_commit(Path(__file__).parent),
        "output_dir": str(Path(cfg.paths.output_dir).resolve()),
    }


@rank_zero_only
def _save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg))


def _finish(cfg: DictConfig, trainer: pl.Trainer, writer: ResultsWriter) -> dict[str, float]:
    metrics = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    _print_table(metrics, writer)
    return metrics


@rank_zero_only
def _print_table(metrics: dict[str, float], writer: ResultsWriter) -> None:
    meta = writer.metadata
    table = Table(title=f"{meta['model']} · {meta['data']}/{meta['category']} · seed {meta['seed']}", min_width=40)
    table.add_column("test metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    Console().print(table)
    Console().print(f"run folder: {meta['output_dir']}")
