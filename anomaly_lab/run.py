"""train(cfg) / evaluate(cfg): instantiate the configured parts, fit, validate, test, write results.

This is the only module that reads Hydra config objects; everything it builds takes plain arguments.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf, read_write
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from anomaly_lab.callbacks import ResultsWriter, git_commit
from anomaly_lab.errors import AnomalyLabError, ConfigError
from anomaly_lab.hardware import fast_mixed_precision
from anomaly_lab.models import AnomalyModel

log = logging.getLogger(__name__)
# The launcher configs in conf/hydra/launcher/ extend the plugins' own, which Hydra reports as a
# deprecation on every job; the configs are complete, so the warning says nothing to our users.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/.*' is validated against ConfigStore schema")
# Lightning 2.6 warns about its own use of torch's pytree API and advertises its cloud products on
# every run: neither concerns our users.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda record: "💡 Tip" not in record.getMessage())
# `trainer.precision: ${fast_mixed_precision:${trainer.accelerator}}` picks bf16 only where it is native.
OmegaConf.register_new_resolver("fast_mixed_precision", fast_mixed_precision, replace=True)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model (if it learns), fit its normal statistics, set thresholds on validation normals,
    save `checkpoints/last.ckpt`, test, and write `metrics.json` in the run folder."""
    if cfg.get("ckpt_path"):
        _check_resumable(cfg, Path(cfg.ckpt_path))
    with _ddp_processes_of_this_job() as trainers:
        pl.seed_everything(cfg.seed, workers=True)
        output_dir = Path(cfg.paths.output_dir)
        _save_config(cfg, output_dir / "config.yaml")
        datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
        trainer, writer = _trainer(cfg, model, datamodule, output_dir)
        trainers.append(trainer)
        if model.needs_training:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        trainer.validate(model, datamodule=datamodule, verbose=False)
        trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt", weights_only=False)
        trainer.test(model, datamodule=datamodule, verbose=False)
        return _finish(cfg, trainer, writer)


def _run_config(ckpt_path: Path) -> DictConfig:
    """The config.yaml of the training run whose <run>/checkpoints/ holds `ckpt_path`."""
    run_config = ckpt_path.parent.parent / "config.yaml"
    if not ckpt_path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint (expected <run>/checkpoints/last.ckpt)")
    if not run_config.is_file():
        raise ConfigError(f"{run_config} not found: ckpt_path must lie in <run>/checkpoints/ of a training run")
    return OmegaConf.load(run_config)


@contextlib.contextmanager
def _ddp_processes_of_this_job() -> Iterator[list[pl.Trainer]]:
    """Run a job's DDP processes and end them cleanly (the job's trainers are appended to the yielded list).

    Lightning starts processes 1..n-1 by running `sys.argv` again with `hydra.run.dir` set to Hydra's
    run folder, and watches them from a thread that kills this process if one ends with an error. At
    the end every process closes the process group (a process that exits with gloo's threads still
    running aborts), and the first waits for the others and stops the watching, so that a late exit
    cannot kill it. In a multirun job the command would start the whole sweep again: it becomes the
    job's own overrides and folder, and the environment Lightning marked as launched is restored, so
    that the next job launches its own processes."""
    trainers: list[pl.Trainer] = []
    multirun = _in_multirun()
    if multirun:
        hydra_cfg = HydraConfig.get()
        argv, environment = list(sys.argv), dict(os.environ)
        sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield trainers
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for trainer in trainers:
            processes = getattr(getattr(trainer.strategy, "launcher", None), "procs", [])
            for process in processes:
                _wait_or_kill(process)
            processes.clear()  # the list Lightning's watching thread reads: nothing left to watch
        if multirun:
            sys.argv = argv
            os.environ.clear()
            os.environ.update(environment)


def _wait_or_kill(process: subprocess.Popen, seconds: float = 60) -> None:
    """Wait for a DDP process of a finished job; kill it if it hangs (e.g. in a collective of a failed job)."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.returncode != 0:
        log.warning(f"DDP process {process.pid} ended with code {process.returncode}")


def _check_resumable(cfg: DictConfig, ckpt_path: Path) -> None:
    """Resuming continues the checkpoint's run: its model, data and seed must be this command's."""
    run_cfg = _run_config(ckpt_path)
    differing = [key for key in ("model", "data", "seed") if OmegaConf.select(run_cfg, key) != cfg.get(key)]
    if differing:
        overrides = ckpt_path.parent.parent / ".hydra" / "overrides.yaml"
        command = " ".join(OmegaConf.load(overrides)) if overrides.is_file() else "its overrides"
        raise ConfigError(
            f"ckpt_path={ckpt_path} comes from a run with other {', '.join(differing)} settings than this "
            f"command's: to resume it, repeat that run's command line ({command}) with ckpt_path"
        )


def with_run_config(cfg: DictConfig) -> DictConfig:
    """An eval or predict config merged with the config of the training run that wrote `cfg.ckpt_path`
    (its model, data, seed, evaluator and callbacks), then with `cfg.overrides`."""
    run_cfg = _run_config(Path(cfg.ckpt_path))
    # The run's model, data, evaluator and callbacks (e.g. a method's own protocol) are kept.
    for key in ("paths", "trainer", "logger", "task_name", "ckpt_path", "hydra"):
        run_cfg.pop(key, None)
    OmegaConf.set_struct(cfg, False)  # the run's keys (model, data, seed, ...) join the task's config
    return OmegaConf.merge(cfg, run_cfg, cfg.overrides)


def load_weights(model: AnomalyModel, ckpt_path: Path) -> AnomalyModel:
    """`model` with the checkpoint's weights, fitted statistics and thresholds."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Re-evaluate a checkpoint with the model and data of the run that wrote it; with `fit_normal`, or
    when `overrides` change the data, refit the statistics of normal data and the thresholds first.
    Runs under DDP and in multirun jobs as `train` does."""
    trained_data = OmegaConf.to_container(_run_config(Path(cfg.ckpt_path)).data, resolve=True)
    cfg = with_run_config(cfg)
    with _ddp_processes_of_this_job() as trainers:
        pl.seed_everything(cfg.seed, workers=True)
        output_dir = Path(cfg.paths.output_dir)
        _save_config(cfg, output_dir / "config.yaml")
        datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
        load_weights(model, Path(cfg.ckpt_path))
        trainer, writer = _trainer(cfg, model, datamodule, output_dir)
        trainers.append(trainer)
        data_changed = OmegaConf.to_container(cfg.data, resolve=True) != trained_data
        if cfg.get("fit_normal") or data_changed:
            if data_changed:
                log.info("the data differ from the training run's: refitting normal statistics and thresholds")
            model.normal_fitted.fill_(False)
            model.image_threshold.fill_(float("nan"))
        if not (model.image_threshold.isfinite() and (model.normal_fitted or not model.has_normal_statistics)):
            trainer.validate(model, datamodule=datamodule, verbose=False)
        trainer.test(model, datamodule=datamodule, verbose=False)
        return _finish(cfg, trainer, writer)


def entry_point(task):
    """Wrap a task for a Hydra main: a user error ends a single run with its one-line message, exit status 1.
    In a multirun, any exception ends only its job: it is recorded in the job's `failed.json` (the error
    line) and `failed_traceback.txt`, the job returns NaN and the sweep goes on."""

    @functools.wraps(task)
    def run(cfg: DictConfig) -> float | None:
        try:
            metrics = task(cfg)
        except Exception as error:
            if _in_multirun():
                _record_failure(cfg, error)
                return float("nan")
            user_error = _user_error(error)
            if user_error is None:
                raise
            message = user_message(user_error)
            log.error(message)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
        return metrics.get(cfg.optimized_metric.removeprefix("test/")) if cfg.get("optimized_metric") else None

    return run


def _user_error(error: Exception) -> AnomalyLabError | None:
    """The user error behind `error` (also when raised in a constructor Hydra called, or a mandatory
    option left unset), or None."""
    if isinstance(error, InstantiationException):
        error = error.__cause__
    if isinstance(error, MissingMandatoryValue):
        return ConfigError(f"{error.full_key} must be set on the command line ({error.full_key}=<value>)")
    return error if isinstance(error, AnomalyLabError) else None


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@rank_zero_only
def _record_failure(cfg: DictConfig, error: Exception) -> None:
    """Write the failed job's `failed.json` (what `anomaly_lab.report` lists) and its traceback."""
    hydra = HydraConfig.get()
    user_error = _user_error(error)
    message = user_message(user_error) if user_error else f"{type(error).__name__}: {error}".strip().splitlines()[0]
    output_dir = Path(hydra.runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "failed_traceback.txt").write_text("".join(traceback.format_exception(error)))
    select = functools.partial(OmegaConf.select, cfg, default=None, throw_on_resolution_failure=False)
    record = {
        "error": message,
        "error_type": type(error).__name__,
        "traceback": "failed_traceback.txt",
        "job": hydra.job.num,
        "overrides": list(hydra.overrides.task),
        "model": hydra.runtime.choices.get("model"),
        "category": select("data.category"),
        "normal_class": select("data.normal_class"),
        "seed": select("seed"),
        "config": _config_choices(),
        "output_dir": str(output_dir.resolve()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (output_dir / "failed.json").write_text(json.dumps(record, indent=2) + "\n")
    _end_wandb_run(exit_code=1)
    log.error(f"job {hydra.job.num} failed: {message}")
    print(f"error: job {hydra.job.num} ({' '.join(hydra.overrides.task)}) failed: {message} "
          f"[{output_dir / 'failed.json'}]; the sweep goes on", file=sys.stderr)


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
    loggers = [_logger(c, writer.metadata) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **model.trainer_settings)
    hyperparameters = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams({**{k: hyperparameters.get(k) for k in ("model", "data", "trainer", "seed", "tags")},
                                "run": writer.metadata})
    return trainer, writer


def _logger(logger_cfg: DictConfig, metadata: dict[str, Any]):
    """Instantiate a logger; a W&B run gets the sweep's group (the multirun folder's name, unless
    `group` is set), a name and tags naming its model, data, class and seed, besides the config's `tags`."""
    if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
        return instantiate(logger_cfg)
    run = {key: metadata.get(key) for key in ("model", "data", "category", "normal_class", "seed")}
    run["experiment"] = metadata["config"].get("experiment")
    tags = [f"{key}:{value}" for key, value in run.items() if value is not None]
    sweep = Path(HydraConfig.get().sweep.dir).name if _in_multirun() else None
    name = "-".join(str(run[key]) for key in ("model", "category", "normal_class", "seed") if run[key] is not None)
    return instantiate(logger_cfg, group=logger_cfg.get("group") or sweep, name=logger_cfg.get("name") or name,
                       tags=[*tags, *(logger_cfg.get("tags") or [])])


def _end_wandb_run(exit_code: int = 0) -> None:
    """Close this process's W&B run, so that the next job of a sweep run in the same process starts its own,
    and flush its files (the W&B service writes them asynchronously)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)
        wandb.teardown()


def _config_choices() -> dict[str, str | None]:
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    return {group: choices.get(group) for group in ("model", "data", "trainer", "experiment")}


def _metadata(cfg: DictConfig, model: AnomalyModel, datamodule) -> dict[str, Any]:
    return {
        "model": model.name,
        "data": getattr(datamodule, "dataset_name", type(datamodule).__name__),
        "category": getattr(datamodule, "category", None),
        # One-vs-all and semi-supervised runs of one dataset differ by these.
        **{key: getattr(datamodule, key) for key in ("normal_class", "anomaly_ratio", "sample_seed")
           if hasattr(datamodule, key)},
        "seed": cfg.seed,
        "config": _config_choices(),
        # The command line's overrides: what tells apart the runs of one sweep (e.g. an ablation's switches).
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
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
    _end_wandb_run()
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
