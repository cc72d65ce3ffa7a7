"""Building the Lightning Trainer from ``conf/trainer`` and the resolved device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from ldm.devices import DeviceSettings


def build_trainer(
    trainer_cfg: dict[str, Any],
    device: DeviceSettings,
    *,
    run_dir: Path,
    logger: Logger | None,
    callbacks: list[Callback],
) -> L.Trainer:
    optional = {
        key: trainer_cfg[key]
        for key in ("limit_train_batches", "limit_val_batches")
        if trainer_cfg.get(key) is not None
    }
    return L.Trainer(
        accelerator=device.device,
        devices=trainer_cfg["devices"],
        precision=device.precision,
        max_epochs=trainer_cfg["max_epochs"],
        max_steps=trainer_cfg["max_steps"],
        gradient_clip_val=trainer_cfg["gradient_clip_val"],
        log_every_n_steps=trainer_cfg["log_every_n_steps"],
        check_val_every_n_epoch=trainer_cfg["check_val_every_n_epoch"],
        fast_dev_run=trainer_cfg["fast_dev_run"],
        deterministic=trainer_cfg["deterministic"],
        # Our ResumableSampler shards across ranks itself and must not be replaced.
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        **optional,
    )
