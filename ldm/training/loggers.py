"""Experiment loggers from ``conf/logger``: W&B (default), CSV, or none."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from ldm.runs import wandb_offline_requested

log = logging.getLogger(__name__)

LOGGER_KINDS = ("wandb", "csv", "none")


def build_logger(logger_cfg: dict[str, Any], run_dir: Path) -> Logger | None:
    kind = logger_cfg.get("kind")
    if kind == "none":
        return None
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "wandb":
        return WandbLogger(
            project=logger_cfg.get("project") or "ldm-coco",
            entity=logger_cfg.get("entity"),
            name=logger_cfg.get("name") or f"{run_dir.parent.name}/{run_dir.name}",
            tags=list(logger_cfg.get("tags") or []),
            save_dir=str(run_dir),
            offline=wandb_offline_requested(logger_cfg),
            id=logger_cfg.get("id"),  # continue an earlier W&B run (e.g. when resuming)
            resume="allow" if logger_cfg.get("id") else None,
        )
    raise ValueError(f"logger.kind must be one of {LOGGER_KINDS}, got {kind!r}")


def close_logger(logger: Logger | None) -> None:
    """Flush and close the logger so an offline W&B run is complete on disk when we return."""
    if logger is None:
        return
    logger.finalize("success")
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()


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
