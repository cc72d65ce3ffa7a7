"""Stage 2 end to end: check inputs, build the caches, train the U-Net, export for sampling."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.caches.datamodule import LatentDataModule
from ldm.data.config import DataConfig
from ldm.evaluation.adherence import prompt_sets
from ldm.evaluation.fid import FidSettings
from ldm.evaluation.validation_data import load_validation_set
from ldm.exports import load_vae_export, save_unet_export
from ldm.runs import point_latest_at, resolve_checkpoint, start_run
from ldm.text import FrozenTextEncoder, TextEncoderConfig
from ldm.training.adherence_curves import AdherenceCurves
from ldm.training.callbacks import ImageLogger, ThroughputLogger
from ldm.training.checkpointing import checkpoint_callbacks
from ldm.training.diffusion_module import LatentDiffusionModule
from ldm.training.fid_curves import FidCurves, fid_k_metric, fid_k_reference
from ldm.training.loggers import (
    build_logger,
    close_logger,
    closed_on_failure,
    log_final_metrics,
)
from ldm.training.trainer import build_trainer, launch_processes, prepare_data_once

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UNetStageResult:
    run_dir: Path
    export_dir: Path | None
    final_metrics: dict[str, float]


def _container(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def _batch_size(batch: dict[str, Any]) -> int:
    return int(batch["index"].shape[0])


def check_inputs_fit(cfg: DictConfig, vae_metadata: dict[str, Any]) -> None:
    """Refuse, before any work, a VAE whose latents or image size do not fit this run."""
    latent_channels = vae_metadata["model_config"]["latent_channels"]
    unet_channels = cfg.model.unet.in_channels
    if latent_channels != unet_channels or cfg.model.unet.out_channels != latent_channels:
        raise ValueError(
            f"The VAE export has {latent_channels} latent channels but the U-Net is configured "
            f"for in/out {unet_channels}/{cfg.model.unet.out_channels}: set "
            f"model.unet.in_channels={latent_channels} model.unet.out_channels={latent_channels}."
        )
    trained_size = vae_metadata.get("extra", {}).get("image_size")
    if trained_size is not None and trained_size != cfg.data.image_size:
        raise ValueError(
            f"The VAE was trained on {trained_size}px images but data.image_size="
            f"{cfg.data.image_size}: set data.image_size={trained_size}, or point vae_export "
            "at a VAE trained at this size."
        )
    downsample = 2 ** (len(vae_metadata["model_config"]["block_channels"]) - 1)
    latent_side = cfg.data.image_size // downsample
    unet_factor = 2 ** (len(cfg.model.unet.channel_multipliers) - 1)
    if latent_side % unet_factor:
        raise ValueError(
            f"{latent_side}×{latent_side} latents cannot be halved {unet_factor.bit_length() - 1} "
            "times by the U-Net: use fewer model.unet.channel_multipliers or a larger image size."
        )


def _callbacks(cfg: DictConfig, run_dir: Path, with_logger: bool) -> tuple[list, ModelCheckpoint]:
    checkpoints, best = checkpoint_callbacks(
        run_dir / "checkpoints",
        monitor="val/loss",
        every_n_steps=cfg.trainer.checkpoint_every_n_steps,
    )
    callbacks: list = [
        *checkpoints,
        ImageLogger(
            len(cfg.validation.prompts),
            run_dir / "images",
            every_n_epochs=cfg.validation.sample_every_n_epochs,
        ),
    ]
    if with_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(ThroughputLogger(batch_size_fn=_batch_size))
    return callbacks, best


def _adherence_curves(
    cfg: DictConfig, text_encoder: FrozenTextEncoder, num_positions: int
) -> AdherenceCurves | None:
    """The adherence callback of ``cfg.evaluation``, its prompts encoded now (the text encoder
    is released before training), or None when it is off or (with FID-k on) cannot judge."""
    every = cfg.evaluation.every_n_steps
    if every is None:
        return None
    if cfg.data.source != "synthetic":
        if cfg.evaluation.fid_k is not None:
            return None  # FID-k curves alone
        raise ValueError(
            f"evaluation.every_n_steps={every} measures prompt adherence, which only the "
            f"synthetic set can judge (data.source={cfg.data.source!r}), and FID-k is off: set "
            "evaluation.fid_k (e.g. 256) for FID curves, evaluation.every_n_steps=null, or "
            "train on data=synthetic."
        )
    prompts = prompt_sets(Path(cfg.data.root), cfg.evaluation.prompts_per_split)
    contexts = {
        split: text_encoder.encode_hidden_states(list(asked), num_positions)
        for split, asked in prompts.items()
    }
    return AdherenceCurves(
        prompts,
        contexts,
        every_n_steps=every,
        sampling=_container(cfg.evaluation.sampling),
        images_per_prompt=cfg.evaluation.images_per_prompt,
        seed=cfg.evaluation.seed,
    )


def _fid_metric(cfg: DictConfig) -> FrechetInceptionDistance | None:
    """FID-k's metric when ``cfg.evaluation`` asks for it, or None. Built before any other
    work, so Inception weights that cannot be had stop the run at once."""
    evaluation = cfg.evaluation
    if evaluation.every_n_steps is None or evaluation.fid_k is None:
        return None
    weights_file = evaluation.fid.weights_file
    settings = FidSettings(
        feature_dim=evaluation.fid.feature_dim,
        weights_file=None if weights_file is None else Path(weights_file),
        config_key="evaluation.fid",
    )
    return fid_k_metric(evaluation.fid_k, settings)


def _fid_curves(
    cfg: DictConfig,
    fid: FrechetInceptionDistance | None,
    text_encoder: FrozenTextEncoder,
    num_positions: int,
    seed: int,
) -> FidCurves | None:
    """The FID-k callback around ``fid``, its prompts encoded now, or None when it is off.
    ``seed`` is the run's: it picks the validation images of a source without a val split."""
    if fid is None:
        return None
    data = DataConfig.from_dict(_container(cfg.data))
    validation = load_validation_set(data, seed=seed, cache_dir=Path(cfg.paths.cache_dir))
    real_images, captions = fid_k_reference(validation.records, cfg.evaluation.fid_k)
    return FidCurves(
        fid,
        real_images,
        text_encoder.encode_hidden_states(captions, num_positions),
        every_n_steps=cfg.evaluation.every_n_steps,
        sampling=_container(cfg.evaluation.sampling),
        resolution_px=cfg.data.image_size,
        batch_size=cfg.data.batch_size,
        seed=cfg.evaluation.seed,
    )


def _export(
    cfg: DictConfig, module: LatentDiffusionModule, vae_export: Path, vae_sha256: str, run_dir: Path
) -> Path:
    description = {
        "diffusion": _container(cfg.diffusion),
        "text_encoder": _container(cfg.text_encoder),
        "latent_scale": module.latent_scale,
        "latent_shape": list(module.hparams.latent_shape),
        "context_length": module.hparams.context_length,
        "image_size": cfg.data.image_size,
        "vae_export": str(vae_export.resolve()),
        "vae_weights_sha256": vae_sha256,
        "cond_dropout": cfg.cond_dropout,
        "ema_steps": module.ema.steps_seen,
        "seed": cfg.seed,
    }
    return save_unet_export(
        run_dir / "export", raw=module.unet, ema=module.ema.module, description=description
    )


def run_unet_stage(cfg: DictConfig, run_dir: Path | None = None) -> UNetStageResult:
    """Train the U-Net on the cached latents of ``cfg.vae_export`` and export it."""
    context = start_run(cfg, run_dir)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, Path(cfg.paths.runs_dir) / cfg.stage)
    vae_export = Path(cfg.vae_export)
    vae, vae_metadata = load_vae_export(vae_export)
    check_inputs_fit(cfg, vae_metadata)
    fid = _fid_metric(cfg)  # Inception loaded now: without its weights, stop before any caching
    processes = launch_processes(_container(cfg.trainer), context.device)  # all of a DDP run
    datamodule = LatentDataModule.from_config(
        cfg.data,
        cfg.cache,
        cfg.text_encoder,
        context.device.loader,
        seed=context.seed,
        cache_dir=Path(cfg.paths.cache_dir),
        vae_export=vae_export,
        encode_device=processes.device,  # this process's own GPU, if it encodes at all
    )
    datamodule.prepare_data_per_node = cfg.trainer.prepare_data_per_node
    prepare_data_once(processes, datamodule)  # built once; then every process opens them
    datamodule.setup("fit")
    latent_shape = list(datamodule.latents["train"].latent_shape)
    text_encoder = FrozenTextEncoder(TextEncoderConfig.from_dict(_container(cfg.text_encoder)))
    prompts = list(cfg.validation.prompts)
    sample_context = text_encoder.encode_hidden_states(prompts, datamodule.text_num_positions)
    adherence = _adherence_curves(cfg, text_encoder, datamodule.text_num_positions)
    fid_curves = _fid_curves(cfg, fid, text_encoder, datamodule.text_num_positions, context.seed)
    del text_encoder  # ~250 MB we no longer need: training reads the caption cache

    # Building the caches may or may not have drawn random numbers: re-seed so that the initial
    # weights depend on the seed alone.
    torch.manual_seed(context.seed)
    module = LatentDiffusionModule(
        unet=_container(cfg.model.unet),
        diffusion=_container(cfg.diffusion),
        optim=_container(cfg.optim),
        ema=_container(cfg.ema),
        cond_dropout=cfg.cond_dropout,
        latent_scale=datamodule.scale_factor,
        latent_shape=latent_shape,
        context_length=datamodule.text_num_positions,
        validation=_container(cfg.validation),
        seed=context.seed,
        compile_mode=context.device.compile_mode,
        fused_optimizer=context.device.fused_optimizer,
        max_consecutive_nonfinite=cfg.trainer.max_consecutive_nonfinite,
        provenance={
            "vae_export": str(vae_export.resolve()),
            "vae_weights_sha256": vae_metadata["weights_sha256"],
            "text_encoder": _container(cfg.text_encoder),
            "image_size": cfg.data.image_size,
        },
    )
    datamodule.train_randomness = module.step_randomness(train=True)
    datamodule.val_randomness = module.step_randomness(train=False)
    module.attach_frozen_inputs(
        empty_context=datamodule.empty_prompt_hidden_states(),
        vae=vae,
        sample_prompts=prompts,
        sample_context=sample_context,
    )
    log.info("U-Net parameters: %s", f"{module.num_parameters:,}")
    logger = build_logger(_container(cfg.logger), context.run_dir, resume_from=ckpt_path)
    if logger is not None:
        logger.log_hyperparams({"unet_parameters": module.num_parameters})
    callbacks, _ = _callbacks(cfg, context.run_dir, with_logger=logger is not None)
    callbacks += [curves for curves in (adherence, fid_curves) if curves is not None]
    trainer = build_trainer(
        _container(cfg.trainer),
        context.device,
        run_dir=context.run_dir,
        logger=logger,
        callbacks=callbacks,
    )
    with warnings.catch_warnings(), closed_on_failure(logger):
        # The EMA copy stays in eval mode on purpose; Lightning would warn about it.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    final = log_final_metrics(trainer, prefix="val/")
    export_dir = None
    if not trainer.fast_dev_run and trainer.is_global_zero:
        export_dir = _export(
            cfg, module, vae_export, vae_metadata["weights_sha256"], context.run_dir
        )
        log.info("U-Net export (raw and EMA weights): %s", export_dir)
        point_latest_at(context.run_dir)
    close_logger(logger)
    return UNetStageResult(context.run_dir, export_dir, final)
