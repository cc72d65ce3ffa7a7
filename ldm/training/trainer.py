"""Building the Lightning Trainer from ``conf/trainer``, and the processes of a many-device run.

One process per device (``trainer.devices`` per node × ``trainer.num_nodes``), started by
Lightning itself (``python train_unet.py trainer=ddp trainer.devices=4``), by torchrun or by
SLURM's ``srun``: Lightning's cluster environments recognise each. ``data.batch_size`` is per
process, so one optimizer step sees ``data.batch_size × processes × accumulate_grad_batches``
samples; the LR schedule and the EMA count optimizer steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric import Fabric
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from ldm.devices import DeviceSettings
from ldm.training.checkpointing import AtomicCheckpointIO
from ldm.training.loggers import RecordWandbRunId

log = logging.getLogger(__name__)


def launch_processes(trainer_cfg: dict[str, Any], device: DeviceSettings) -> Fabric:
    """Start every process of the run now (or join those torchrun or SLURM started), with
    their process group, through Lightning Fabric.

    Stage 2 builds and opens its caches before the Trainer exists (the module's shapes come
    from them), so the processes must exist first; the Trainer built later finds the process
    group initialised and joins it. In a single-device run this only selects the device.
    """
    fabric = Fabric(
        accelerator=device.device,
        devices=trainer_cfg["devices"],
        num_nodes=trainer_cfg["num_nodes"],
        strategy=trainer_cfg["strategy"],
    )
    fabric.launch()
    return fabric


def prepare_data_once(processes: Fabric, datamodule: L.LightningDataModule) -> None:
    """``datamodule.prepare_data()`` in one process while the others wait, as ``Trainer.fit``
    does it: global rank 0, or each node's local rank 0 when ``datamodule.prepare_data_per_node``
    (caches on node-local disks). Caches are built once, never raced; the wait has no timeout,
    since building the COCO caches can outlast the process group's."""
    per_node = datamodule.prepare_data_per_node
    rank = processes.local_rank if per_node else processes.global_rank
    with processes.rank_zero_first(local=per_node):
        if rank == 0:
            datamodule.prepare_data()


def training_plan(trainer: L.Trainer, optim: dict[str, Any]) -> dict[str, Any]:
    """What one optimizer step is and how many the run makes: the global batch (per-process
    batch × processes × accumulated micro-batches) and the LR schedule in optimizer steps."""
    per_process = int(trainer.train_dataloader.batch_size)
    return {
        "batch_size_per_process": per_process,
        "processes": trainer.world_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "global_batch_size": per_process * trainer.world_size * trainer.accumulate_grad_batches,
        "optimizer_steps": int(trainer.estimated_stepping_batches),
        "lr": optim["lr"],
        "lr_warmup_steps": optim["lr_warmup_steps"],
        "lr_schedule": optim["lr_schedule"],
    }


class TrainingPlanReport(Callback):
    """States the global batch and the LR schedule per optimizer step when training starts,
    in the console and in the loggers' hyperparameters."""

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        plan = training_plan(trainer, dict(pl_module.hparams["optim"]))
        log.info(
            "Global batch %d = %d per process × %d process(es) × %d micro-batch(es) per optimizer "
            "step; %s optimizer steps; LR %s: %d warmup steps, then %s",
            plan["global_batch_size"],
            plan["batch_size_per_process"],
            plan["processes"],
            plan["accumulate_grad_batches"],
            f"{plan['optimizer_steps']:,}",
            plan["lr"],
            plan["lr_warmup_steps"],
            plan["lr_schedule"],
        )
        for logger in trainer.loggers:
            logger.log_hyperparams({f"plan/{name}": value for name, value in plan.items()})


def build_trainer(
    trainer_cfg: dict[str, Any],
    device: DeviceSettings,
    *,
    run_dir: Path,
    logger: Logger | None,
    callbacks: list[Callback],
) -> L.Trainer:
    """The Trainer of ``conf/trainer`` on the resolved device (plus the training-plan report)."""
    optional = {
        key: trainer_cfg[key]
        for key in ("limit_train_batches", "limit_val_batches")
        if trainer_cfg[key] is not None
    }
    if isinstance(logger, WandbLogger):  # resuming a checkpoint continues its W&B run
        callbacks = [*callbacks, RecordWandbRunId(logger)]
    return L.Trainer(
        accelerator=device.device,
        strategy=trainer_cfg["strategy"],
        devices=trainer_cfg["devices"],
        num_nodes=trainer_cfg["num_nodes"],
        precision=device.precision,
        max_epochs=trainer_cfg["max_epochs"],
        max_steps=trainer_cfg["max_steps"],
        accumulate_grad_batches=trainer_cfg["accumulate_grad_batches"],
        gradient_clip_val=trainer_cfg["gradient_clip_val"],
        log_every_n_steps=trainer_cfg["log_every_n_steps"],
        check_val_every_n_epoch=trainer_cfg["check_val_every_n_epoch"],
        fast_dev_run=trainer_cfg["fast_dev_run"],
        deterministic=trainer_cfg["deterministic"],
        # The data modules shard both loaders themselves (ldm.data.resumable_loader); Lightning's
        # injection would wrap and re-shard the ResumableSampler.
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
        logger=logger if logger is not None else False,
        callbacks=[*callbacks, TrainingPlanReport()],
        plugins=[AtomicCheckpointIO()],  # no half-written checkpoint, whatever stops the run
        **optional,
    )
