"""The Lightning module that trains the β-VAE (stage 1)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.models.vae import VAE, VAEConfig, count_parameters, vae_loss
from ldm.training.optim import build_optimizer
from ldm.training.step_noise import step_generator


class VAEModule(L.LightningModule):
    """MSE + β·KL training of :class:`VAE`, with PSNR/SSIM validation and latent statistics.

    The measured latent statistics live in registered buffers (CompVis style), so every
    checkpoint written after :meth:`set_latent_stats` carries its scale factor with it.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        kl_weight: float,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vae = VAE(VAEConfig.from_dict(model))
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

    # Lightning's ThroughputMonitor reads this; unknown here, so it reports images/s only.
    flops_per_batch: float | None = None

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.vae)

    def _log_losses(self, stage: str, losses: dict[str, Tensor], batch_size: int) -> None:
        on_step = stage == "train"
        for name, value in losses.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name == "total",
                batch_size=batch_size,
            )

    def _log_latent_channels(self, stage: str, latents: Tensor, batch_size: int) -> None:
        on_step = stage == "train"
        detached = latents.detach().float()
        for channel, (mean, std) in enumerate(
            zip(detached.mean(dim=(0, 2, 3)), detached.std(dim=(0, 2, 3)), strict=True)
        ):
            self.log(
                f"{stage}/latent_mean_c{channel}",
                mean,
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
            )
            self.log(
                f"{stage}/latent_std_c{channel}",
                std,
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
            )

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every image of the batch was unreadable: skip the step
            return None
        images = batch["image"]
        generator = step_generator(self.seed, self.current_epoch, batch_idx, self.global_rank)
        reconstruction, posterior = self.vae(images, generator=generator)
        losses = vae_loss(reconstruction, images, posterior, self.kl_weight)
        self._log_losses("train", losses, images.shape[0])
        if self.trainer.log_every_n_steps and batch_idx % self.trainer.log_every_n_steps == 0:
            self._log_latent_channels("train", posterior.sample(generator), images.shape[0])
        return losses["total"]

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        """Deterministic: reconstruct from the posterior mean, so runs compare exactly."""
        if batch is None:
            return
        images = batch["image"]
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
        images = batch["image"].to(self.device)
        reconstructions = self.vae.decode(self.vae.encode(images).mode())
        return {"inputs": images, "reconstructions": reconstructions}

    def set_latent_stats(self, stats: dict[str, Any]) -> None:
        self.latent_channel_mean.copy_(torch.tensor(stats["channel_mean"]))
        self.latent_channel_std.copy_(torch.tensor(stats["channel_std"]))
        self.latent_scale_factor.fill_(stats["scale_factor"])

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(
            self.vae.parameters(), self.optim, int(self.trainer.estimated_stepping_batches)
        )
