"""Samples for the metrics, made by ``sample.py``'s machinery and kept as lossless PNGs.

The checkpoint, its VAE (checked by fingerprint) and its text encoder are loaded once by the
functions ``sample.py`` uses, and every setting of a sweep reuses them. Image i of a caption
list gets seed ``seed + i`` and a PNG recording its prompt, seed, settings and U-Net
fingerprint, exactly as ``sample.py`` would write it: any sample can be made again alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.devices import DeviceSettings
from ldm.diffusion import ScheduleConfig, make_schedule
from ldm.evaluation.pixels import number_of_batches
from ldm.exports import SamplingCheckpoint
from ldm.pipeline import LatentDiffusionPipeline, SamplingOptions
from ldm.sampling import (
    ImageJob,
    SampleRequest,
    load_matching_vae,
    load_sampling_checkpoint,
    save_png,
)
from ldm.sampling.outputs import image_filename, to_pil_images
from ldm.sampling.run import autocast_dtype, image_metadata, load_text_encoder


@dataclass(frozen=True)
class SamplingModel:
    """A trained U-Net with its VAE and text encoder, ready to generate."""

    checkpoint: SamplingCheckpoint
    pipeline: LatentDiffusionPipeline  # holds the U-Net, the VAE and the text encoder


def load_sampling_model(
    ckpt: str | Path, weights: str, vae_export: str | Path | None, device: DeviceSettings
) -> SamplingModel:
    """Load as ``sample.py`` does (safe loading, VAE fingerprint check), once per evaluation."""
    checkpoint = load_sampling_checkpoint(ckpt, weights)
    pipeline = LatentDiffusionPipeline(
        unet=checkpoint.unet,
        vae=load_matching_vae(checkpoint, vae_export),
        text_encoder=load_text_encoder(checkpoint),
        schedule=make_schedule(ScheduleConfig(**checkpoint.diffusion)),
        latent_normalizer=checkpoint.latent_normalizer,
        latent_shape=checkpoint.latent_shape,
        context_length=checkpoint.context_length,
        device=device.torch_device,
        autocast_dtype=autocast_dtype(device.precision),
    )
    return SamplingModel(checkpoint, pipeline)


def generate(
    model: SamplingModel,
    prompts: Sequence[str],
    options: SamplingOptions,
    *,
    images_per_prompt: int,
    seed: int,
    batch_size: int,
    out_dir: Path,
    progress: bool,
    description: str,
) -> Iterator[tuple[list[ImageJob], torch.Tensor]]:
    """Batch by batch: the jobs and their images (B, 3, H, W) in [-1, 1], each image already
    written to ``out_dir`` as a PNG that records how it was made."""
    request = SampleRequest(
        prompts=tuple(prompts),
        negative_prompt="",
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
        seed=seed,
        options=options,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    total = number_of_batches(len(request.jobs()), batch_size)
    for batch in tqdm(
        request.batches(), total=total, desc=description, disable=not progress, dynamic_ncols=True
    ):
        images = model.pipeline.generate(
            [job.prompt for job in batch], [job.seed for job in batch], options
        )
        for job, image in zip(batch, to_pil_images(images), strict=True):
            path = out_dir / image_filename(job.prompt_index, job.prompt, job.seed)
            save_png(image, path, image_metadata(request, model.checkpoint, job))
        yield batch, images
