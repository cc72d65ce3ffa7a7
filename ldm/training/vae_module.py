"""The Lightning module that trains the β-VAE (stage 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.data.batch_randomness import StepRandomness
from ldm.data.transforms import to_model_range
from ldm.models.vae import VAE, VAEConfig, vae_loss
from ldm.training.fast_module import FastTrainingModule
from ldm.training.optim import build_optimizer
from ldm.training.step_metrics import logging_due_after_this_step


class VAEModule(FastTrainingModule):
    """MSE + β·KL training of :class:`VAE`, with PSNR/SSIM validation and latent statistics.

    The measured latent statistics live in registered buffers (CompVis style), so every
    checkpoint written after :meth:`set_latent_stats` carries its scale factor with it.
    ``channels_last`` runs the convolutions in NHWC layout (faster on some GPUs).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        kl_weight: float,
        seed: int = 0,
        compile_mode: str = "none",
        fused_optimizer: bool = False,
        channels_last: bool = False,
        max_consecutive_nonfinite: int | None = 10,
    ) -> None:
        super().__init__(
            compile_mode=compile_mode,
            fused_optimizer=fused_optimizer,
            max_consecutive_nonfinite=max_consecutive_nonfinite,
        )
        self.save_hyperparameters()
        self.vae = VAE(VAEConfig.from_dict(model))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.vae.to(memory_format=self.memory_format)
        self.kl_weight = kl_weight
        self.seed = seed
        self.optim = optim
        latent_channels = self.vae.config.latent_channels
        self.register_buffer("latent_channel_mean", torch.full((latent_channels,), float("nan")))
        self.register_buffer("latent_channel_std", torch.full((latent_channels,), float("nan")))
        self.register_buffer("latent_scale_factor", torch.tensor(float("nan")))
        # [-1, 1] images: a data range of 2.
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)

        self._training_losses = self.compiled(self._losses)

    @property
    def trained(self) -> torch.nn.Module:
        return self.vae

    def step_randomness(self, image_size_px: int) -> StepRandomness:
        """The posterior sample's ε, drawn by the training loader with each batch."""
        side = image_size_px // self.vae.downsample_factor
        return StepRandomness(posterior_noise_shape=(self.vae.config.latent_channels, side, side))

    def _losses(self, images: Tensor, noise: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Losses and the sampled latents of one training batch: what ``trainer.compile``
        compiles."""
        images = images.contiguous(memory_format=self.memory_format)
        reconstruction, posterior = self.vae(images, noise=noise)
        latents = posterior.mean + posterior.std * noise
        return vae_loss(reconstruction, images, posterior, self.kl_weight), latents

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every image of the batch was unreadable: skip the step
            return None
        images = to_model_range(batch["image"])  # uint8 from the image cache, on the device
        losses, latents = self._training_losses(images, batch["posterior_noise"])
        for name, value in losses.items():
            self.window.add(f"train/{name}", value)
        if logging_due_after_this_step(self.trainer):
            self._add_latent_channels(latents)
        return losses["total"]

    def _add_latent_channels(self, latents: Tensor) -> None:
        """Per-channel mean and std of the sampled latents, for the logging window."""
        detached = latents.detach().float()
        channels = range(detached.shape[1])
        self.window.add(
            tuple(f"train/latent_mean_c{c}" for c in channels), detached.mean((0, 2, 3))
        )
        self.window.add(tuple(f"train/latent_std_c{c}" for c in channels), detached.std((0, 2, 3)))

    def _log_losses(self, stage: str, losses: dict[str, Tensor], batch_size: int) -> None:
        # Epoch means, averaged over the processes' validation shards once, at the epoch's end.
        for name, value in losses.items():
            self.log(
                f"{stage}/{name}",
                value,
                prog_bar=name == "total",
                batch_size=batch_size,
                sync_dist=True,
            )

    def _log_latent_channels(self, stage: str, latents: Tensor, batch_size: int) -> None:
        detached = latents.detach().float()
        means, stds = detached.mean(dim=(0, 2, 3)), detached.std(dim=(0, 2, 3))
        for channel in range(detached.shape[1]):
            for name, values in (("mean", means), ("std", stds)):
                self.log(
                    f"{stage}/latent_{name}_c{channel}",
                    values[channel],
                    batch_size=batch_size,
                    sync_dist=True,
                )

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        """Deterministic: reconstruct from the posterior mean, so runs compare exactly."""
        if batch is None:
            return
        images = to_model_range(batch["image"])
        posterior = self.vae.encode(images)
        reconstruction = self.vae.decode(posterior.mode())
        losses = vae_loss(reconstruction, images, posterior, self.kl_weight)
        self._log_losses("val", losses, images.shape[0])
        self._log_latent_channels("val", posterior.mode(), images.shape[0])
        clamped = reconstruction.float().clamp(-1, 1)
        self.val_psnr(clamped, images.float())
        self.val_ssim(clamped, images.float())
        self.log("val/psnr", self.val_psnr, on_epoch=True, prog_bar=True)
        self.log("val/ssim", self.val_ssim, on_epoch=True)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Inputs and their reconstructions (from the posterior mean), in [-1, 1]."""
        images = to_model_range(batch["image"].to(self.device))
        reconstructions = self.vae.decode(self.vae.encode(images).mode())
        return {"inputs": images, "reconstructions": reconstructions}

    def set_latent_stats(self, stats: dict[str, Any]) -> None:
        self.latent_channel_mean.copy_(torch.tensor(stats["channel_mean"]))
        self.latent_channel_std.copy_(torch.tensor(stats["channel_std"]))
        self.latent_scale_factor.fill_(stats["scale_factor"])

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(
            self.vae.parameters(),
            self.optim,
            int(self.trainer.estimated_stepping_batches),
            fused=self.fused_optimizer,
        )
