"""``sample.py`` end to end: load the checkpoint, check the request, generate, write, log.

Models are loaded in order of cost (U-Net metadata and weights, then the VAE, then the text
encoder). The U-Net comes first because its schedule decides which sampling options exist;
every other input the user can get wrong is checked before the VAE and the text encoder load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldm.data.transforms import image_to_model_tensor
from ldm.devices import DeviceSettings, DeviceUnavailableError, resolve_device
from ldm.diffusion import ScheduleConfig, make_schedule
from ldm.exports import SamplingCheckpoint, load_unet_for_sampling, load_vae_export
from ldm.models.vae import VAE
from ldm.pipeline import LatentDiffusionPipeline
from ldm.sampling.errors import SamplingError
from ldm.sampling.outputs import (
    grid_filename,
    image_filename,
    labelled_grid,
    save_png,
    to_pil_images,
)
from ldm.sampling.request import ImageJob, SampleRequest, request_from_config
from ldm.text import FrozenTextEncoder, TextEncoderConfig, TextEncoderWeightsUnavailableError
from ldm.training.loggers import build_logger, close_logger

log = logging.getLogger(__name__)

SAMPLING_LOGGERS = ("none", "wandb")  # a CSV file cannot hold the images sampling produces


@dataclass(frozen=True)
class SamplingResult:
    out_dir: Path
    image_paths: list[Path]
    grid_paths: list[Path]


def run_sampling(cfg: DictConfig) -> SamplingResult:
    """Generate ``n`` images per prompt as ``cfg`` (``conf/sample.yaml``) asks; see sample.py."""
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    if logger_cfg.get("kind") not in SAMPLING_LOGGERS:
        raise SamplingError(
            f"logger={logger_cfg.get('kind')} cannot record images; sampling supports "
            f"{' | '.join(SAMPLING_LOGGERS)} (the PNGs are in out_dir either way)."
        )
    device = sampling_device(cfg.trainer)
    checkpoint = load_sampling_checkpoint(cfg.ckpt, cfg.weights)
    schedule = make_schedule(ScheduleConfig(**checkpoint.diffusion))
    request = request_from_config(cfg, schedule.config)
    vae = load_matching_vae(checkpoint, cfg.vae_export)
    text_encoder = load_text_encoder(checkpoint)
    warn_about_cut_prompts(
        text_encoder, [*request.prompts, request.negative_prompt], checkpoint.context_length
    )
    pipeline = LatentDiffusionPipeline(
        unet=checkpoint.unet,
        vae=vae,
        text_encoder=text_encoder,
        schedule=schedule,
        latent_normalizer=checkpoint.latent_normalizer,
        latent_shape=checkpoint.latent_shape,
        context_length=checkpoint.context_length,
        device=device.torch_device,
        autocast_dtype=autocast_dtype(device.precision),
        offload=bool(cfg.offload),
        compile_mode=request.compile_mode,
        # Compiled, every batch is padded to one size (see LatentDiffusionPipeline).
        fixed_batch_size=None if request.compile_mode == "none" else request.full_batch_size,
    )
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "Sampling %d image(s) for %d prompt(s) with %s, %d steps, cfg_scale %g on %s (%s, "
        "compile %s) from %s (%s weights) into %s",
        len(request.prompts) * request.images_per_prompt,
        len(request.prompts),
        request.options.sampler,
        request.options.steps,
        request.options.cfg_scale,
        device.device,
        device.precision,
        request.compile_mode,
        checkpoint.source,
        checkpoint.weights,
        out_dir,
    )
    images, image_paths = generate_and_save(
        pipeline, request, checkpoint, out_dir, progress=bool(cfg.progress)
    )
    grids, grid_paths = save_grids(images, request, checkpoint, out_dir)
    log_grids(logger_cfg, out_dir, grids, request.prompts)
    return SamplingResult(out_dir, image_paths, grid_paths)


def sampling_device(trainer_cfg: DictConfig) -> DeviceSettings:
    """The device and precision from the ``trainer`` group, as training resolves them.

    Only the device keys are read: the rest of the group (epochs, logging cadence) belongs to
    training and may interpolate keys a sampling config does not have.
    """
    trainer = {key: trainer_cfg[key] for key in ("device", "precision", "num_workers", "compile")}
    trainer["profiles"] = OmegaConf.to_container(trainer_cfg.profiles, resolve=True)
    try:
        return resolve_device(trainer)
    except (DeviceUnavailableError, ValueError) as error:
        raise SamplingError(str(error)) from None


def autocast_dtype(precision: str) -> torch.dtype | None:
    """Lightning's precision name → the autocast dtype sampling runs the U-Net in (None: fp32)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def load_sampling_checkpoint(path: str | Path, weights: str = "ema") -> SamplingCheckpoint:
    """The U-Net and what it was trained with (``ldm.exports.load_unet_for_sampling``), with a
    message for the user when ``path`` is not a usable U-Net export or checkpoint."""
    try:
        return load_unet_for_sampling(path, weights)
    except (ValueError, FileNotFoundError) as error:
        raise SamplingError(str(error)) from None


def load_matching_vae(checkpoint: SamplingCheckpoint, vae_export: str | Path | None = None) -> VAE:
    """The VAE whose latents the U-Net was trained on, refusing any other by fingerprint.

    A retrained or replaced VAE decodes the U-Net's latents into garbage without any error, so
    its weights' SHA-256 must equal the one recorded at training time.
    """
    path = Path(vae_export) if vae_export is not None else checkpoint.vae_export
    named_by = "vae_export=" if vae_export is not None else f"the checkpoint {checkpoint.source}"
    try:
        vae, metadata = load_vae_export(path)
    except FileNotFoundError as error:
        raise SamplingError(
            f"The VAE export named by {named_by} cannot be found: {error} If it moved, pass "
            f"vae_export=<its new directory> (its weights sha256 must be "
            f"{checkpoint.vae_weights_sha256})."
        ) from None
    except ValueError as error:
        raise SamplingError(f"Cannot load the VAE export {path}: {error}") from None
    if metadata["weights_sha256"] != checkpoint.vae_weights_sha256:
        raise SamplingError(
            f"The VAE export {path} has weights sha256 {metadata['weights_sha256']}, but the U-Net "
            f"in {checkpoint.source} was trained on latents of the VAE with sha256 "
            f"{checkpoint.vae_weights_sha256}: the VAE was retrained or replaced since. Pass "
            "vae_export= the VAE export the U-Net was trained with, or train the U-Net again on "
            "this VAE (`python train_unet.py vae_export=...`)."
        )
    return vae


def load_text_encoder(checkpoint: SamplingCheckpoint) -> FrozenTextEncoder:
    """The frozen text encoder the U-Net was trained with, rebuilt from its recorded config."""
    try:
        return FrozenTextEncoder(TextEncoderConfig.from_dict(checkpoint.text_encoder))
    except (TextEncoderWeightsUnavailableError, ValueError, FileNotFoundError) as error:
        raise SamplingError(
            f"Cannot build the text encoder {checkpoint.source} was trained with: {error}"
        ) from None


def warn_about_cut_prompts(
    encoder: FrozenTextEncoder, prompts: Sequence[str], context_length: int
) -> None:
    """Say which prompts are longer than the model reads: their end is silently ignored.

    The U-Net cross-attends to the first ``context_length`` token positions it was trained on
    (at most the encoder's 77), so a longer prompt is cut there, not only at 77.
    """
    for prompt in dict.fromkeys(prompts):
        tokens = encoder.token_count(prompt)
        if tokens > context_length:
            log.warning(
                "Prompt %r has %d tokens (with start and end markers) but this model reads only "
                "the first %d (its text context length): the rest is truncated and has no effect.",
                prompt,
                tokens,
                context_length,
            )


def generate_and_save(
    pipeline: LatentDiffusionPipeline,
    request: SampleRequest,
    checkpoint: SamplingCheckpoint,
    out_dir: Path,
    *,
    progress: bool,
) -> tuple[dict[ImageJob, Image.Image], list[Path]]:
    """Every image, batch by batch, each written as soon as its batch is done."""
    init_images = None
    if request.init_image is not None:
        init_images = image_to_model_tensor(request.init_image, checkpoint.image_size)[None]
    images: dict[ImageJob, Image.Image] = {}
    paths: list[Path] = []
    for batch in request.batches():
        generated = pipeline.generate(
            [job.prompt for job in batch],
            [job.seed for job in batch],
            request.options,
            negative_prompts=[request.negative_prompt] * len(batch),
            init_images=init_images,
            progress=progress,
        )
        for job, image in zip(batch, to_pil_images(generated), strict=True):
            path = out_dir / image_filename(job.prompt_index, job.prompt, job.seed)
            paths.append(save_png(image, path, image_metadata(request, checkpoint, job)))
            images[job] = image
    return images, paths


def image_metadata(
    request: SampleRequest, checkpoint: SamplingCheckpoint, job: ImageJob
) -> dict[str, Any]:
    """What an image's PNG records: enough to make it again with sample.py."""
    return {
        "prompt": job.prompt,
        "seed": job.seed,
        **run_metadata(request, checkpoint),
    }


def run_metadata(request: SampleRequest, checkpoint: SamplingCheckpoint) -> dict[str, Any]:
    """The settings every image of the run shares."""
    options = request.options
    metadata = {
        "negative_prompt": request.negative_prompt,
        "sampler": options.sampler,
        "steps": options.steps,
        "cfg_scale": options.cfg_scale,
        "eta": options.eta,
        "strength": options.strength,
        "checkpoint": str(checkpoint.source),
        "checkpoint_weights": checkpoint.weights,
        "checkpoint_sha256": checkpoint.fingerprint,
        "software": "ldm-coco sample.py",
    }
    if options.guidance_interval is not None:  # as sample.py takes it: [0.43, null]
        metadata["guidance_interval"] = json.dumps(options.guidance_interval.as_config())
    if request.init_image_path is not None:
        metadata["init_image"] = str(request.init_image_path)
    return metadata


def save_grids(
    images: dict[ImageJob, Image.Image],
    request: SampleRequest,
    checkpoint: SamplingCheckpoint,
    out_dir: Path,
) -> tuple[list[Image.Image], list[Path]]:
    """One grid per prompt, labelled with the prompt, recording the seeds it shows."""
    grids, paths = [], []
    for index, prompt in enumerate(request.prompts):
        jobs = [job for job in images if job.prompt_index == index]
        grid = labelled_grid([images[job] for job in jobs], prompt)
        metadata = {
            "prompt": prompt,
            "seeds": ",".join(str(job.seed) for job in jobs),
            **run_metadata(request, checkpoint),
        }
        paths.append(save_png(grid, out_dir / grid_filename(index, prompt), metadata))
        grids.append(grid)
    return grids, paths


def log_grids(
    logger_cfg: dict[str, Any],
    out_dir: Path,
    grids: Sequence[Image.Image],
    prompts: Sequence[str],
) -> None:
    """Send the grids to W&B when ``logger=wandb`` (offline runs record into ``out_dir``)."""
    logger = build_logger(logger_cfg, out_dir)
    if logger is None:
        return
    logger.log_image(key="samples", images=list(grids), caption=list(prompts))
    close_logger(logger)
