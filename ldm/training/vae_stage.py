"""Stage 1 end to end: train the VAE, measure its latents, export what stage 2 consumes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ldm.config import plain
from ldm.data.datamodule import CaptionedImageDataModule
from ldm.exports import save_vae_export
from ldm.latent_stats import measure_latent_statistics
from ldm.runs import RunContext
from ldm.training.callbacks import ImageLogger
from ldm.training.stage import Fitted, Stage, StageParts, StageResult, run_stage, standard_callbacks
from ldm.training.vae_module import VAEModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAEStageResult(StageResult):
    checkpoint: Path | None = None  # final.ckpt: the exported weights, latent statistics included
    latent_stats: dict[str, Any] = field(default_factory=dict)


def run_vae_stage(cfg: DictConfig, run_dir: Path | None = None) -> VAEStageResult:
    """Train (unless ``train=false``), then measure latent statistics and export."""
    if not cfg.train and cfg.ckpt_path is None:
        raise ValueError(
            "train=false measures and exports an existing checkpoint: also give "
            "ckpt_path=runs/vae/<run>/checkpoints/<file>.ckpt"
        )
    stage = Stage(
        title="VAE",
        build=_build,
        callbacks=_callbacks,
        export=_export,
        result_type=VAEStageResult,
        train=cfg.train,
    )
    return run_stage(cfg, stage, run_dir)


def _build(cfg: DictConfig, run: RunContext) -> StageParts:
    datamodule = CaptionedImageDataModule.from_config(
        cfg.data,
        run.device.loader,
        seed=run.seed,
        cache_dir=Path(cfg.paths.cache_dir),
        train_device=run.device.torch_device,  # data.image_cache=auto: on for CUDA
    )
    datamodule.prepare_data_per_node = cfg.trainer.prepare_data_per_node
    module = VAEModule(
        model=plain(cfg.model.vae),
        optim=plain(cfg.optim),
        kl_weight=cfg.loss.kl_weight,
        seed=run.seed,
        compile_mode=run.device.compile_mode,
        fused_optimizer=run.device.fused_optimizer,
        channels_last=run.device.channels_last,
        max_consecutive_nonfinite=cfg.trainer.max_consecutive_nonfinite,
    )
    datamodule.train_randomness = module.step_randomness(cfg.data.image_size)
    return StageParts(datamodule, module)


def _batch_size(batch: dict[str, Any] | None) -> int:
    return 0 if batch is None else int(batch["image"].shape[0])


def _callbacks(
    cfg: DictConfig, run_dir: Path, with_logger: bool
) -> tuple[list[Callback], ModelCheckpoint]:
    callbacks, best = standard_callbacks(
        cfg, run_dir, monitor="val/total", batch_size=_batch_size, with_logger=with_logger
    )
    per_epoch = ModelCheckpoint(  # the VAE is small: keep every epoch's weights
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        every_n_epochs=1,
        save_top_k=-1,
        save_on_train_epoch_end=True,
    )
    return [*callbacks, per_epoch, ImageLogger(cfg.logging.num_images, run_dir / "images")], best


def _export(fitted: Fitted) -> VAEStageResult:
    """Measure the latent statistics of the chosen checkpoint's weights; write them into
    ``final.ckpt`` and the export stage 2 reads."""
    cfg, run, checkpoint = fitted.cfg, fitted.run, fitted.checkpoint
    if not checkpoint.is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {checkpoint}")
    module: VAEModule = fitted.parts.module
    _load_weights(module, checkpoint)
    stats = _measure_latents(cfg, module, fitted.parts.datamodule, run.device.torch_device)
    module.set_latent_stats(stats)
    final = run.run_dir / "checkpoints" / "final.ckpt"
    _write_final_checkpoint(checkpoint, module, final)
    export_dir = save_vae_export(
        run.run_dir / "export",
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
    for logger in fitted.trainer.loggers:
        logger.log_metrics(
            {
                "latent/global_std": stats["global_std"],
                "latent/scale_factor": stats["scale_factor"],
            },
            step=fitted.trainer.global_step,
        )
    return VAEStageResult(
        run.run_dir,
        fitted.final_metrics,
        export_dir=Path(export_dir),
        checkpoint=final,
        latent_stats=stats,
    )


def _measure_latents(
    cfg: DictConfig,
    module: VAEModule,
    datamodule: CaptionedImageDataModule,
    device: torch.device,
) -> dict[str, Any]:
    """Latent statistics over (up to ``latent_stats.max_batches`` batches of) training images."""
    datamodule.setup("fit")
    loader = datamodule.measurement_dataloader()
    max_batches = cfg.latent_stats.max_batches
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    module.to(device)
    return measure_latent_statistics(
        module.vae,
        tqdm(loader, total=total, desc="Measuring latent statistics", dynamic_ncols=True),
        max_batches,
        device,
        seed=cfg.seed,
    )


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
