"""Stage 1 end to end: train the VAE, measure its latents, export what stage 2 consumes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ldm.data.datamodule import CaptionedImageDataModule
from ldm.exports import save_vae_export
from ldm.latent_stats import measure_latent_statistics
from ldm.progress import progress_bar
from ldm.runs import point_latest_at, resolve_checkpoint, start_run
from ldm.training.callbacks import ImageLogger, ThroughputLogger
from ldm.training.checkpointing import checkpoint_callbacks
from ldm.training.loggers import (
    build_logger,
    close_logger,
    closed_on_failure,
    log_final_metrics,
)
from ldm.training.trainer import build_trainer
from ldm.training.vae_module import VAEModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAEStageResult:
    run_dir: Path
    export_dir: Path
    checkpoint: Path
    latent_stats: dict[str, Any]


def _container(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def _batch_size(batch: dict[str, Any] | None) -> int:
    return 0 if batch is None else int(batch["image"].shape[0])


def _callbacks(cfg: DictConfig, run_dir: Path, with_logger: bool) -> tuple[list, ModelCheckpoint]:
    checkpoint_dir = run_dir / "checkpoints"
    checkpoints, best = checkpoint_callbacks(
        checkpoint_dir, monitor="val/total", every_n_steps=cfg.trainer.checkpoint_every_n_steps
    )
    per_epoch = ModelCheckpoint(  # the VAE is small: keep every epoch's weights
        dirpath=checkpoint_dir,
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        every_n_epochs=1,
        save_top_k=-1,
        save_on_train_epoch_end=True,
    )
    callbacks = [
        *checkpoints,
        per_epoch,
        ImageLogger(cfg.logging.num_images, run_dir / "images"),
    ]
    if with_logger:  # these two only report through a logger
        callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(ThroughputLogger(batch_size_fn=_batch_size))
    return callbacks, best


def _load_weights(module: VAEModule, checkpoint: Path) -> None:
    """Weights only, without unpickling arbitrary objects from the file."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])


def _write_final_checkpoint(source: Path, module: VAEModule, target: Path) -> None:
    """The chosen checkpoint with the measured latent statistics in its buffers."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    state["state_dict"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(target)


def measure_and_export(
    cfg: DictConfig,
    module: VAEModule,
    datamodule: CaptionedImageDataModule,
    checkpoint: Path,
    run_dir: Path,
    device: torch.device,
) -> VAEStageResult:
    """Measure latent statistics over training images and write checkpoint + export."""
    datamodule.setup("fit")
    loader = datamodule.measurement_dataloader()
    max_batches = cfg.latent_stats.max_batches
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    module.to(device)
    stats = measure_latent_statistics(
        module.vae,
        progress_bar(loader, total=total, description="Measuring latent statistics"),
        max_batches,
        device,
        seed=cfg.seed,
    )
    module.set_latent_stats(stats)
    final = run_dir / "checkpoints" / "final.ckpt"
    _write_final_checkpoint(checkpoint, module, final)
    export_dir = save_vae_export(
        run_dir / "export",
        module.vae.cpu(),
        latent_stats=stats,
        extra={
            "source_checkpoint": str(checkpoint),
            "image_size": cfg.data.image_size,
            "data": {
                "source": cfg.data.source,
                "root": str(cfg.data.root),
                "subset": cfg.data.subset,
            },
            "kl_weight": cfg.loss.kl_weight,
            "seed": cfg.seed,
        },
    )
    log.info(
        "Latent std %.4f → scale factor %.4f (per-channel std %s). Export: %s",
        stats["global_std"],
        stats["scale_factor"],
        ", ".join(f"{s:.3f}" for s in stats["channel_std"]),
        export_dir,
    )
    return VAEStageResult(run_dir, Path(export_dir), final, stats)


def run_vae_stage(cfg: DictConfig, run_dir: Path | None = None) -> VAEStageResult:
    """Train (unless ``train=false``), then measure latent statistics and export."""
    context = start_run(cfg, run_dir)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, Path(cfg.paths.runs_dir) / cfg.stage)
    datamodule = CaptionedImageDataModule.from_config(
        cfg.data,
        context.device.loader,
        seed=context.seed,
        cache_dir=Path(cfg.paths.cache_dir),
        train_device=context.device.torch_device,  # data.image_cache=auto: on for CUDA
    )
    datamodule.prepare_data_per_node = cfg.trainer.prepare_data_per_node
    module = VAEModule(
        model=_container(cfg.model.vae),
        optim=_container(cfg.optim),
        kl_weight=cfg.loss.kl_weight,
        seed=context.seed,
        compile_mode=context.device.compile_mode,
        fused_optimizer=context.device.fused_optimizer,
        channels_last=context.device.channels_last,
        max_consecutive_nonfinite=cfg.trainer.max_consecutive_nonfinite,
    )
    datamodule.train_randomness = module.step_randomness(cfg.data.image_size)
    log.info("VAE parameters: %s", f"{module.num_parameters:,}")
    logger = build_logger(_container(cfg.logger), context.run_dir, resume_from=ckpt_path)
    callbacks, best = _callbacks(cfg, context.run_dir, with_logger=logger is not None)
    trainer = build_trainer(
        _container(cfg.trainer),
        context.device,
        run_dir=context.run_dir,
        logger=logger,
        callbacks=callbacks,
    )
    if logger is not None:
        logger.log_hyperparams({"vae_parameters": module.num_parameters})

    if cfg.train:
        with closed_on_failure(logger):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        log_final_metrics(trainer, prefix="val/")
        checkpoint = Path(best.best_model_path or context.run_dir / "checkpoints" / "last.ckpt")
        if trainer.fast_dev_run:
            close_logger(logger)
            return VAEStageResult(context.run_dir, Path(), Path(), {})
    elif ckpt_path is None:
        raise ValueError(
            "train=false measures and exports an existing checkpoint: also give "
            "ckpt_path=runs/vae/<run>/checkpoints/<file>.ckpt"
        )
    else:
        checkpoint = ckpt_path
    if not trainer.is_global_zero:  # global rank 0 alone measures and exports
        close_logger(logger)
        return VAEStageResult(context.run_dir, Path(), Path(), {})
    if not checkpoint.is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {checkpoint}")
    _load_weights(module, checkpoint)
    result = measure_and_export(
        cfg, module, datamodule, checkpoint, context.run_dir, context.device.torch_device
    )
    if logger is not None:
        logger.log_metrics(
            {
                "latent/global_std": result.latent_stats["global_std"],
                "latent/scale_factor": result.latent_stats["scale_factor"],
            },
            step=trainer.global_step,
        )
    close_logger(logger)
    point_latest_at(context.run_dir)
    return result
