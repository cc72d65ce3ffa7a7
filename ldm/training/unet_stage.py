"""Stage 2 end to end: check inputs, build the caches, train the U-Net, export for sampling."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.caches.datamodule import LatentDataModule
from ldm.config import plain
from ldm.data.config import DataConfig
from ldm.diffusion import ScheduleConfig
from ldm.evaluation.adherence import prompt_sets
from ldm.evaluation.fid import FidSettings
from ldm.evaluation.validation_data import load_validation_set
from ldm.exports import load_vae_export, save_unet_export
from ldm.latent_norm import LatentNormalizer
from ldm.models.denoiser import denoiser_config
from ldm.models.vae import VAE
from ldm.pipeline import SamplingOptions
from ldm.runs import RunContext
from ldm.text import FrozenTextEncoder, TextEncoderConfig
from ldm.training.adherence_curves import AdherenceCurves
from ldm.training.callbacks import ImageLogger
from ldm.training.diffusion_module import LatentDiffusionModule
from ldm.training.fid_curves import FidCurves, fid_k_metric, fid_k_reference
from ldm.training.stage import Fitted, Stage, StageParts, StageResult, run_stage, standard_callbacks
from ldm.training.trainer import launch_processes, prepare_data_once

log = logging.getLogger(__name__)


def run_unet_stage(cfg: DictConfig, run_dir: Path | None = None) -> StageResult:
    """Train the U-Net on the cached latents of ``cfg.vae_export`` and export it."""
    stage = Stage(
        title="U-Net",
        build=_build,
        callbacks=_callbacks,
        export=_export,
        result_type=StageResult,
    )
    return run_stage(cfg, stage, run_dir)


def load_fitting_vae(cfg: DictConfig) -> tuple[VAE, dict[str, Any]]:
    """The frozen VAE of ``cfg.vae_export`` and its metadata, refused before any work when its
    latents or image size do not fit this run."""
    vae, vae_metadata = load_vae_export(Path(cfg.vae_export))
    check_inputs_fit(cfg, vae_metadata)
    return vae, vae_metadata


def latent_normalizer(cfg: DictConfig, vae_metadata: dict[str, Any]) -> LatentNormalizer:
    """The ``cfg.latent_norm`` normalisation from the VAE export's latent statistics, refused
    before any work when the choice is unknown or the statistics cannot define it."""
    try:
        return LatentNormalizer.from_latent_stats(
            cfg.latent_norm,
            vae_metadata.get("latent_stats", {}),
            latent_channels=vae_metadata["model_config"]["latent_channels"],
        )
    except ValueError as error:
        raise ValueError(
            f"Cannot normalise the latents of vae_export={cfg.vae_export}: {error}"
        ) from None


def check_inputs_fit(cfg: DictConfig, vae_metadata: dict[str, Any]) -> None:
    """Refuse, before any work, a VAE whose latents or image size do not fit this run."""
    name = cfg.model.denoiser
    denoiser = denoiser_config(name, plain(cfg.model[name]))
    latent_channels = vae_metadata["model_config"]["latent_channels"]
    if latent_channels != denoiser.in_channels or denoiser.out_channels != latent_channels:
        raise ValueError(
            f"The VAE export has {latent_channels} latent channels but the denoiser ({name}) is "
            f"configured for in/out {denoiser.in_channels}/{denoiser.out_channels}: set "
            f"model.{name}.in_channels={latent_channels} "
            f"model.{name}.out_channels={latent_channels}."
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
    factor = denoiser.downsample_factor
    if latent_side % factor:
        fix = {
            "unet": "use fewer model.unet.channel_multipliers",
            "dit": f"use a model.dit.patch_size that divides {latent_side}",
        }[name]
        raise ValueError(
            f"{latent_side}×{latent_side} latents do not divide into the {name}'s "
            f"{factor}×{factor} cells (U-Net: 2× per level; DiT: its patches): {fix}, or a "
            "larger image size."
        )


def open_caches(cfg: DictConfig, run: RunContext) -> LatentDataModule:
    """The caches of ``cfg.vae_export``, built where missing or stale (by one process while the
    others of a DDP run wait) and opened in every process: what ``python -m ldm.caches`` does
    without the training around it."""
    processes = launch_processes(plain(cfg.trainer), run.device)  # all of a DDP run
    datamodule = LatentDataModule.from_config(
        cfg.data,
        cfg.cache,
        cfg.text_encoder,
        run.device.loader,
        seed=run.seed,
        cache_dir=Path(cfg.paths.cache_dir),
        vae_export=Path(cfg.vae_export),
        encode_device=processes.device,  # this process's own GPU, if it encodes at all
    )
    datamodule.prepare_data_per_node = cfg.trainer.prepare_data_per_node
    prepare_data_once(processes, datamodule)  # built once; then every process opens them
    datamodule.setup("fit")
    return datamodule


def _build(cfg: DictConfig, run: RunContext) -> StageParts:
    vae, vae_metadata = load_fitting_vae(cfg)
    normalizer = latent_normalizer(cfg, vae_metadata)
    fid = _fid_metric(cfg)  # Inception loaded now: without its weights, stop before any caching
    datamodule = open_caches(cfg, run)
    num_positions = datamodule.text_num_positions
    text_encoder = FrozenTextEncoder(TextEncoderConfig.from_dict(plain(cfg.text_encoder)))
    prompts = list(cfg.validation.prompts)
    sample_context = text_encoder.encode_hidden_states(prompts, num_positions)
    curves = [
        _adherence_curves(cfg, text_encoder, num_positions),
        _fid_curves(cfg, fid, text_encoder, num_positions, run.seed),
    ]
    del text_encoder  # ~250 MB we no longer need: training reads the caption cache

    # Building the caches may or may not have drawn random numbers: re-seed so that the initial
    # weights depend on the seed alone.
    torch.manual_seed(run.seed)
    module = LatentDiffusionModule(
        unet=plain(cfg.model[cfg.model.denoiser]),  # the denoiser's config section
        denoiser=cfg.model.denoiser,
        diffusion=plain(cfg.diffusion),
        optim=plain(cfg.optim),
        ema=plain(cfg.ema),
        cond_dropout=cfg.cond_dropout,
        latent_norm=normalizer.describe(),
        latent_shape=list(datamodule.latents["train"].latent_shape),
        context_length=num_positions,
        validation=plain(cfg.validation),
        seed=run.seed,
        compile_mode=run.device.compile_mode,
        fused_optimizer=run.device.fused_optimizer,
        max_consecutive_nonfinite=cfg.trainer.max_consecutive_nonfinite,
        provenance={
            "vae_export": str(Path(cfg.vae_export).resolve()),
            "vae_weights_sha256": vae_metadata["weights_sha256"],
            "text_encoder": plain(cfg.text_encoder),
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
    return StageParts(datamodule, module, [curve for curve in curves if curve is not None])


def _batch_size(batch: dict[str, Any]) -> int:
    return int(batch["index"].shape[0])


def _callbacks(
    cfg: DictConfig, run_dir: Path, with_logger: bool
) -> tuple[list[Callback], ModelCheckpoint]:
    callbacks, best = standard_callbacks(
        cfg, run_dir, monitor="val/loss", batch_size=_batch_size, with_logger=with_logger
    )
    images = ImageLogger(
        len(cfg.validation.prompts),
        run_dir / "images",
        every_n_epochs=cfg.validation.sample_every_n_epochs,
    )
    return [*callbacks, images], best


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
        sampling=_evaluation_sampling(cfg),
        images_per_prompt=cfg.evaluation.images_per_prompt,
        seed=cfg.evaluation.seed,
    )


def _evaluation_sampling(cfg: DictConfig) -> SamplingOptions:
    """``evaluation.sampling``, checked before training rather than at the first measurement."""
    try:
        return SamplingOptions.checked(
            diffusion=ScheduleConfig.from_dict(plain(cfg.diffusion)),
            **plain(cfg.evaluation.sampling),
        )
    except ValueError as error:
        raise ValueError(f"evaluation.sampling: {error}") from None


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
    data = DataConfig.from_dict(plain(cfg.data))
    validation = load_validation_set(data, seed=seed, cache_dir=Path(cfg.paths.cache_dir))
    real_images, captions = fid_k_reference(validation.records, cfg.evaluation.fid_k)
    return FidCurves(
        fid,
        real_images,
        text_encoder.encode_hidden_states(captions, num_positions),
        every_n_steps=cfg.evaluation.every_n_steps,
        sampling=_evaluation_sampling(cfg),
        resolution_px=cfg.data.image_size,
        batch_size=cfg.data.batch_size,
        seed=cfg.evaluation.seed,
    )


def _export(fitted: Fitted) -> StageResult:
    """The raw and EMA weights, with what sampling needs to rebuild the pipeline around them."""
    run_dir = fitted.run.run_dir
    export_dir = save_unet_export(run_dir / "export", fitted.parts.module.export())
    log.info("U-Net export (raw and EMA weights): %s", export_dir)
    return StageResult(run_dir, fitted.final_metrics, export_dir)
