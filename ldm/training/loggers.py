"""Experiment loggers from ``conf/logger``: W&B (default), CSV, or none."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from ldm.runs import wandb_offline_requested

log = logging.getLogger(__name__)

LOGGER_KINDS = ("wandb", "csv", "none")
# The checkpoint entry naming the W&B run that logged the training it holds.
WANDB_RUN_ID_KEY = "wandb_run_id"


def build_logger(
    logger_cfg: dict[str, Any], run_dir: Path, *, resume_from: Path | None = None
) -> Logger | None:
    """The logger of ``conf/logger``. A W&B logger resuming ``resume_from`` continues the W&B run
    that checkpoint records (``logger.id`` chooses another)."""
    kind = logger_cfg["kind"]
    if kind == "none":
        return None
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "wandb":
        run_id = logger_cfg["id"]
        if run_id is None and resume_from is not None:
            run_id = wandb_run_id_in(resume_from)
            if run_id is not None:
                log.info("Continuing W&B run %s, recorded in %s", run_id, resume_from)
        return WandbLogger(
            project=logger_cfg["project"],
            entity=logger_cfg["entity"],
            name=logger_cfg["name"] or f"{run_dir.parent.name}/{run_dir.name}",
            tags=list(logger_cfg["tags"]),
            save_dir=str(run_dir),
            offline=wandb_offline_requested(logger_cfg),
            id=run_id,  # continue an earlier W&B run (when resuming)
            resume="allow" if run_id else None,
        )
    raise ValueError(f"logger.kind must be one of {LOGGER_KINDS}, got {kind!r}")


def wandb_run_id_in(checkpoint: Path) -> str | None:
    """The W&B run id a checkpoint records (None: it was written without W&B). Memory-mapped
    and without unpickling, so the weights are not read."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return state.get(WANDB_RUN_ID_KEY)


class RecordWandbRunId(Callback):
    """Writes the W&B run id into every checkpoint, so resuming it continues the same W&B run."""

    def __init__(self, logger: WandbLogger) -> None:
        self.logger = logger

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.logger.version is not None:  # None until the W&B run has started
            checkpoint[WANDB_RUN_ID_KEY] = self.logger.version


def close_logger(logger: Logger | None, *, succeeded: bool = True) -> None:
    """Flush and close the logger so an offline W&B run is complete on disk when we return."""
    if logger is None:
        return
    logger.finalize("success" if succeeded else "failed")
    if isinstance(logger, WandbLogger):
        logger.experiment.finish(exit_code=0 if succeeded else 1)


@contextlib.contextmanager
def closed_on_failure(logger: Logger | None) -> Iterator[None]:
    """Close the logger when the block raises (SIGTERM, Ctrl-C, an error): a W&B run left open
    keeps its id busy in the W&B service, so the resumed run could not continue it."""
    try:
        yield
    except BaseException:
        close_logger(logger, succeeded=False)
        raise


def log_final_metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    """Print the last validation numbers: the console shows them after the progress bar."""
    final = {
        name: float(value)
        for name, value in sorted(trainer.callback_metrics.items())
        if name.startswith(prefix) and value.numel() == 1
    }
    if final:
        log.info("Final validation: %s", ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    return final
