"""The VAE posterior of every image, encoded once, so stage 2 never runs the VAE encoder.

For each image the cache holds the posterior mean and std in float16, from which each epoch
draws a fresh z = μ + σ·ε (as the seed's training did) — storing one sampled z would freeze the
noise. Horizontal flips survive caching by also encoding the mirrored image: a convolutional VAE
is not exactly flip-equivariant, so flipping a latent would be a different augmentation than
flipping the image. That doubles the (one-off) encoding time and the latent storage
(8 KB per image at 128 px), small next to the text cache.

Layout (N images, V = 2 with flips else 1, latents (C, h, w)):
``mean.npy``/``std.npy`` (N, V, C, h, w) float16 — variant 0 original, 1 mirrored;
``image_ids.npy`` (N,) int64; ``captions.json`` every caption of every image.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.data.array_store import building_cache, open_complete_cache
from ldm.data.coco_index import CaptionedImage
from ldm.data.image_cache import decoded_batches
from ldm.data.transforms import to_model_range
from ldm.models.vae import VAE

STAGE2_BUILD_HINT = "Build it with LatentDataModule.prepare_data() (train_unet.py does this first)."
IMAGE_LATENTS_KIND = "image_latents"


def records_fingerprint(records: Sequence[CaptionedImage]) -> str:
    """SHA-256 of the image ids and captions in order: both caches of a split must agree on it."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.image_id, list(record.captions)]).encode())
    return digest.hexdigest()


def image_latent_key(
    vae_weights_sha256: str, data_key: dict[str, Any], hflip: bool, images_sha256: str
) -> dict[str, Any]:
    """Everything the cached latents depend on; the cache is rebuilt when any of it changes.

    ``images_sha256`` (:func:`~ldm.data.image_cache.image_files_fingerprint`: each file's size
    and modification time) notices an image replaced under the same name.
    """
    return {
        "vae_weights_sha256": vae_weights_sha256,
        "data": data_key,
        "hflip": hflip,
        "images_sha256": images_sha256,
    }


@dataclass(frozen=True)
class ImageLatentCache:
    """An opened image-latent cache; the arrays are read-only memory maps."""

    folder: Path
    metadata: dict[str, Any]
    mean: np.ndarray  # (N, V, C, h, w) float16
    std: np.ndarray  # (N, V, C, h, w) float16
    image_ids: np.ndarray  # (N,) int64
    captions: list[list[str]]

    @classmethod
    def open(cls, folder: Path) -> ImageLatentCache:
        opened = open_complete_cache(
            folder, IMAGE_LATENTS_KIND, STAGE2_BUILD_HINT, ("mean", "std", "image_ids")
        )
        captions_file = opened["folder"] / "captions.json"
        return cls(**opened, captions=json.loads(captions_file.read_text(encoding="utf-8")))

    def __reduce__(self) -> tuple:
        """Pickle as the folder name: DataLoader workers reopen the memory maps themselves
        instead of receiving a copy of every array."""
        return (ImageLatentCache.open, (self.folder,))

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    @property
    def has_flipped(self) -> bool:
        return int(self.mean.shape[1]) == 2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.mean.shape[2:]
        return int(channels), int(height), int(width)


def build_image_latent_cache(
    folder: Path,
    records: Sequence[CaptionedImage],
    vae: VAE,
    *,
    key: dict[str, Any],
    image_size_px: int,
    hflip: bool,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> ImageLatentCache:
    """Encode ``records`` with the frozen ``vae`` into a new cache at ``folder``."""
    records = list(records)
    variants = 2 if hflip else 1
    latent_side = image_size_px // vae.downsample_factor
    shape = (len(records), variants, vae.config.latent_channels, latent_side, latent_side)
    batches = decoded_batches(
        records,
        image_size_px=image_size_px,
        batch_size=batch_size,
        num_workers=num_workers,
        what="latents",
    )
    vae = vae.to(device).eval()
    started = time.perf_counter()
    with building_cache(folder) as writer, torch.no_grad():
        mean = writer.new_array("mean.npy", shape, np.float16)
        std = writer.new_array("std.npy", shape, np.float16)
        image_ids = writer.new_array("image_ids.npy", (len(records),), np.int64)
        for rows, batch in batches:
            images = to_model_range(batch["image"]).to(device)  # (B, 3, S, S)
            if hflip:
                images = torch.cat([images, images.flip(-1)])  # (V·B, 3, S, S)
            posterior = vae.encode(images)
            mean[rows] = _by_image(posterior.mean, variants)
            std[rows] = _by_image(posterior.std, variants)
            image_ids[rows] = batch["image_id"].numpy()
        writer.write_json("captions.json", [list(record.captions) for record in records])
        seconds = time.perf_counter() - started
        writer.finish(
            IMAGE_LATENTS_KIND,
            key,
            {
                "count": len(records),
                "variants": ["original", "hflip"][:variants],
                "latent_shape": list(shape[2:]),
                "dtype": "float16",
                "records_sha256": records_fingerprint(records),
                "encode_seconds": round(seconds, 2),
            },
        )
    return ImageLatentCache.open(folder)


def _by_image(values: torch.Tensor, variants: int) -> np.ndarray:
    """(V·B, C, h, w), variants stacked batch-wise → (B, V, C, h, w) float16 on the CPU."""
    per_variant = values.float().cpu().unflatten(0, (variants, -1))  # (V, B, C, h, w)
    return per_variant.transpose(0, 1).numpy().astype(np.float16)
