"""Measure the frozen VAE's latent distribution to derive the diffusion scale factor.

Stage 2 trains on `scale_factor · z`; with scale_factor = 1 / std(z) measured on our own
VAE and data, those latents have unit variance, which the noise schedule assumes. The value
is measured, never borrowed from another model's VAE.
"""

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.data.transforms import to_model_range
from ldm.models.vae import VAE

# The keys every statistics dict carries; the export format records exactly these.
LATENT_STAT_KEYS = (
    "channel_mean",
    "channel_std",
    "global_mean",
    "global_std",
    "scale_factor",
    "num_latents",
    "sampled_posterior",
)


def scale_factor_from_std(std: float) -> float:
    """1 / std, refusing values that would give a meaningless or infinite scale."""
    if not math.isfinite(std) or std <= 0.0:
        raise ValueError(
            f"Latent std must be finite and positive to define a scale factor, got {std}. "
            "The VAE produced constant or non-finite latents; check its weights and inputs."
        )
    return 1.0 / std


class _RunningChannelMoments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch
    (Chan et al.'s parallel update) in float64 so millions of values don't lose precision
    the way a running sum of squares does."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None  # (C,)
        self.sq_dev_sum: Tensor | None = None  # (C,)

    def update(self, latents: Tensor) -> None:
        values = latents.detach().to("cpu", torch.float64)  # (B, C, h, w)
        batch_count = values.numel() // values.shape[1]
        batch_mean = values.mean(dim=(0, 2, 3))  # (C,)
        batch_sq_dev = (values - batch_mean[:, None, None]).square().sum(dim=(0, 2, 3))  # (C,)
        if self.mean is None or self.sq_dev_sum is None:
            self.count, self.mean, self.sq_dev_sum = batch_count, batch_mean, batch_sq_dev
            return
        if batch_mean.shape != self.mean.shape:
            raise ValueError(
                f"Latent channel count changed between batches: {self.mean.shape[0]} then "
                f"{batch_mean.shape[0]}. Measure one VAE at a time."
            )
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (batch_count / total)
        self.sq_dev_sum = (
            self.sq_dev_sum + batch_sq_dev + delta.square() * (self.count * batch_count / total)
        )
        self.count = total


def measure_latent_statistics(
    vae: VAE,
    batches: Iterable[Tensor | Mapping[str, Tensor]],
    max_batches: int | None,
    device: torch.device | str,
    *,
    sample_posterior: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Encode image batches with the frozen VAE and summarise the latents.

    `sample_posterior=True` (default) measures z = μ + σ·ε drawn with a generator seeded by
    `seed`, because those sampled latents are what Stage 2 trains on; the scale must make
    *them* unit-variance. Pass False to measure the posterior means instead.

    Batches are image tensors (B, C, H, W) in [-1, 1] or as uint8 pixels (converted on
    `device`), or dicts holding them under "image"; at most `max_batches` are read (None reads
    all). Stds are population stds (divide by N). The VAE runs in eval mode without gradients
    and is put back in its previous mode afterwards.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be None or at least 1, got {max_batches}.")
    generator = torch.Generator().manual_seed(seed)  # CPU: same draws on any device
    moments = _RunningChannelMoments()
    num_latents = 0
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                images = to_model_range(_images_from_batch(batch).to(device))
                posterior = vae.encode(images)
                latents = posterior.sample(generator) if sample_posterior else posterior.mode()
                moments.update(latents)  # latents: (B, C, h, w)
                num_latents += latents.shape[0]
    finally:
        vae.train(was_training)

    if moments.mean is None or moments.sq_dev_sum is None:
        raise ValueError(
            "No batches to measure latent statistics on; the data loader was empty. "
            "Check the dataset path and split."
        )
    channel_mean = moments.mean
    channel_var = moments.sq_dev_sum / moments.count
    # Every channel has the same count, so the global moments follow exactly from the
    # per-channel ones: within-channel spread plus spread of the channel means.
    global_mean = channel_mean.mean()
    global_var = (channel_var + (channel_mean - global_mean).square()).mean()
    global_std = math.sqrt(global_var.item())
    return {
        "channel_mean": channel_mean.tolist(),
        "channel_std": channel_var.sqrt().tolist(),
        "global_mean": global_mean.item(),
        "global_std": global_std,
        "scale_factor": scale_factor_from_std(global_std),
        "num_latents": num_latents,
        "sampled_posterior": sample_posterior,
    }


def _images_from_batch(batch: Tensor | Mapping[str, Tensor]) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping) and "image" in batch:
        return batch["image"]
    found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise TypeError(
        f"Each batch must be an image tensor or a dict with key 'image', got {found}. "
        "Pass the image data loader, or a loader whose batches carry an 'image' entry."
    )
