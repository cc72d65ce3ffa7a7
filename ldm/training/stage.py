"""One shape for both training stages, after lightning-hydra-template's ``train.py``.

:func:`run_stage` starts the run, has the stage build its data and Lightning module, then does
logger → callbacks → trainer → fit → export → ``latest`` the same way for every stage. A stage
(:mod:`~ldm.training.vae_stage`, :mod:`~ldm.training.unet_stage`) fills in only what differs:
a :class:`Stage` of its builders.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from ldm.config import plain
from ldm.models.vae import count_parameters
from ldm.runs import RunContext, point_latest_at, resolve_checkpoint, start_run
from ldm.training.callbacks import ThroughputLogger
from ldm.training.checkpointing import checkpoint_callbacks
from ldm.training.fast_module import FastTrainingModule
from ldm.training.loggers import build_logger, close_logger, closed_on_failure, log_final_metrics
from ldm.training.trainer import build_trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResult:
    """What a stage's run hands on."""

    run_dir: Path
    final_metrics: dict[str, float] = field(default_factory=dict)  # the last val/ numbers
    export_dir: Path | None = None  # None: nothing exported (fast_dev_run, or not global rank 0)


ResultT = TypeVar("ResultT", bound=StageResult)


@dataclass(frozen=True)
class StageParts:
    """What a stage builds before the logger and the trainer exist."""

    datamodule: L.LightningDataModule
    module: FastTrainingModule
    callbacks: list[Callback] = field(default_factory=list)  # made while building (e.g. curves)


@dataclass(frozen=True)
class Fitted:
    """A stage's run after ``fit``, on global rank zero: what its export reads."""

    cfg: DictConfig
    run: RunContext
    parts: StageParts
    trainer: L.Trainer
    checkpoint: Path  # the best checkpoint (else last.ckpt); without training, ckpt_path
    final_metrics: dict[str, float]


# (cfg, run_dir, with_logger) → (callbacks, the callback keeping the best checkpoint)
CallbacksBuilder = Callable[[DictConfig, Path, bool], tuple[list[Callback], ModelCheckpoint]]


@dataclass(frozen=True)
class Stage(Generic[ResultT]):
    """What one stage fills in; :func:`run_stage` does the rest."""

    title: str  # names the trained network in the log: "VAE", "U-Net"
    build: Callable[[DictConfig, RunContext], StageParts]
    callbacks: CallbacksBuilder
    export: Callable[[Fitted], ResultT]
    result_type: type[ResultT]  # what a run that exports nothing returns
    train: bool = True  # False: export ``ckpt_path`` as it is, without fitting


def run_stage(cfg: DictConfig, stage: Stage[ResultT], run_dir: Path | None = None) -> ResultT:
    """Train one stage and export what the next one consumes (global rank zero exports, then
    points ``<runs>/<stage>/latest`` at the run)."""
    run = start_run(cfg, run_dir)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, Path(cfg.paths.runs_dir) / cfg.stage)
    parts = stage.build(cfg, run)
    parameters = count_parameters(parts.module.trained)
    log.info("%s parameters: %s", stage.title, f"{parameters:,}")
    logger = build_logger(plain(cfg.logger), run.run_dir, resume_from=ckpt_path)
    if logger is not None:
        logger.log_hyperparams({f"{cfg.stage}_parameters": parameters})
    callbacks, best = stage.callbacks(cfg, run.run_dir, logger is not None)
    trainer = build_trainer(
        plain(cfg.trainer),
        run.device,
        run_dir=run.run_dir,
        logger=logger,
        callbacks=[*callbacks, *parts.callbacks],
    )
    with closed_on_failure(logger):
        if stage.train:
            _fit(trainer, parts, ckpt_path)
            checkpoint = Path(best.best_model_path or run.run_dir / "checkpoints" / "last.ckpt")
        else:
            checkpoint = ckpt_path
        final = log_final_metrics(trainer, prefix="val/")
        if trainer.fast_dev_run or not trainer.is_global_zero:
            result = stage.result_type(run.run_dir, final)
        else:
            result = stage.export(Fitted(cfg, run, parts, trainer, checkpoint, final))
            point_latest_at(run.run_dir)
    close_logger(logger)
    return result


def _fit(trainer: L.Trainer, parts: StageParts, ckpt_path: Path | None) -> None:
    with warnings.catch_warnings():
        # Frozen copies (stage 2's EMA weights) stay in eval mode on purpose; Lightning warns.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path)


def standard_callbacks(
    cfg: DictConfig,
    run_dir: Path,
    *,
    monitor: str,
    batch_size: Callable[[Any], int],
    with_logger: bool,
) -> tuple[list[Callback], ModelCheckpoint]:
    """What every stage keeps: best (by ``monitor``), last and periodic checkpoints, and, when
    there is a logger to report to, the learning rate and the throughput (samples counted by
    ``batch_size(batch)``). Also returns the callback that keeps the best checkpoint."""
    callbacks, best = checkpoint_callbacks(
        run_dir / "checkpoints", monitor=monitor, every_n_steps=cfg.trainer.checkpoint_every_n_steps
    )
    if with_logger:
        callbacks += [
            LearningRateMonitor(logging_interval="step"),
            ThroughputLogger(batch_size_fn=batch_size),
        ]
    return callbacks, best
