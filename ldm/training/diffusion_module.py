"""The Lightning module that trains the text-conditional U-Net on cached latents (stage 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import grad_norm
from torch import Tensor

from ldm.diffusion import NoiseSchedule, ScheduleConfig, diffusion_loss
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, count_parameters
from ldm.pipeline import LatentDiffusionPipeline, SamplingOptions
from ldm.training.ema import EMA
from ldm.training.optim import build_optimizer
from ldm.training.step_noise import normal_like, step_generator


def timestep_buckets(t: Tensor, num_timesteps: int, num_buckets: int) -> Tensor:
    """Bucket index of each timestep: equal-width slices of [0, T)."""
    return torch.div(t * num_buckets, num_timesteps, rounding_mode="floor")


def bucket_name(bucket: int, num_timesteps: int, num_buckets: int) -> str:
    low = bucket * num_timesteps // num_buckets
    high = (bucket + 1) * num_timesteps // num_buckets - 1
    return f"t{low:03d}-{high:03d}"


@dataclass
class _FrozenModels:
    """Holds frozen models outside ``nn.Module`` registration: never trained, never saved."""

    vae: VAE | None = None


class LatentDiffusionModule(L.LightningModule):
    """ε/v-prediction training with condition dropout, EMA, warmup + cosine LR.

    Batches come from the latent cache: posterior mean and std of each image (a fresh
    z = μ + σ·ε is drawn every step) and the cached text hidden states of one caption.
    The frozen VAE and text encoder are never children of this module, so they are never
    trained and never saved in its checkpoints; the VAE is attached only for sample grids.
    """

    def __init__(
        self,
        *,
        unet: dict[str, Any],
        diffusion: dict[str, Any],
        optim: dict[str, Any],
        ema: dict[str, Any],
        cond_dropout: float,
        latent_scale: float,
        latent_shape: list[int],
        context_length: int,
        validation: dict[str, Any],
        provenance: dict[str, Any],
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.save_hyperparameters()
        self.unet = UNet(UNetConfig.from_dict(unet))
        self.ema = EMA(self.unet, **ema)
        self.schedule = NoiseSchedule(ScheduleConfig(**diffusion))
        self.cond_dropout = cond_dropout
        self.latent_scale = latent_scale
        self.seed = seed
        self.validation = validation
        context_dim = self.unet.config.context_dim
        # Text hidden states of the empty prompt: what dropped captions are replaced by.
        self.register_buffer("empty_context", torch.zeros(1, context_length, context_dim))
        self.register_buffer(
            "sample_context", torch.zeros(0, context_length, context_dim), persistent=False
        )
        self.sample_prompts: list[str] = []
        self._frozen = _FrozenModels()

    # Lightning's ThroughputMonitor reads this; unknown here, so it reports latents/s only.
    flops_per_batch: float | None = None

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.unet)

    def attach_frozen_inputs(
        self, *, empty_context: Tensor, vae: VAE, sample_prompts: list[str], sample_context: Tensor
    ) -> None:
        """Give the module what it needs from the frozen encoders (before ``fit``)."""
        self.empty_context.copy_(empty_context.reshape_as(self.empty_context))
        self.sample_context = sample_context.to(self.empty_context)
        self.sample_prompts = list(sample_prompts)
        self._frozen.vae = vae.eval().requires_grad_(False)

    def on_fit_start(self) -> None:
        self.schedule = self.schedule.to(device=self.device)

    def _latents(self, batch: dict[str, Any], generator: torch.Generator | None) -> Tensor:
        """z = μ + σ·ε scaled to unit variance; the posterior mean when ``generator`` is None."""
        mean, std = batch["latent_mean"], batch["latent_std"]
        z = mean if generator is None else mean + std * normal_like(std, generator)
        return z * self.latent_scale

    def _drop_conditions(self, context: Tensor, generator: torch.Generator) -> Tensor:
        """Replace a ``cond_dropout`` fraction of captions by the empty prompt (for CFG)."""
        draws = torch.rand(context.shape[0], generator=generator).to(context.device)
        drop = draws < self.cond_dropout
        return torch.where(drop[:, None, None], self.empty_context.to(context.dtype), context)

    def _log_bucketed(self, stage: str, losses: Tensor, t: Tensor) -> None:
        num_buckets = self.validation["timestep_buckets"]
        T = self.schedule.num_train_timesteps
        buckets = timestep_buckets(t, T, num_buckets)
        for bucket in range(num_buckets):
            selected = losses[buckets == bucket]
            if selected.numel():
                self.log(
                    f"{stage}/loss_{bucket_name(bucket, T, num_buckets)}",
                    selected.mean(),
                    on_step=False,
                    on_epoch=True,
                    batch_size=selected.numel(),
                )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        generator = step_generator(self.seed, self.current_epoch, batch_idx, self.global_rank)
        z = self._latents(batch, generator)
        context = self._drop_conditions(batch["text_hidden_states"], generator)
        T = self.schedule.num_train_timesteps
        t = torch.randint(0, T, (z.shape[0],), generator=generator).to(z.device)
        noise = normal_like(z, generator)
        losses = diffusion_loss(self.unet, self.schedule, z, context, t=t, noise=noise)  # (B,)
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        self._log_bucketed("train", losses.detach(), t)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self.unet, norm_type=2)
        self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Update the EMA right after each optimizer step: once per step under gradient
        accumulation, and before ``on_train_batch_end``, where checkpoints are written."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.unet)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/ema_decay", self.ema.decay)

    def validation_losses(self, batch: dict[str, Any], batch_idx: int) -> tuple[Tensor, Tensor]:
        """Per-sample loss at fixed timesteps (spread over [0, T)) with noise fixed by the batch
        index: the same number for the same weights, run after run."""
        z = self._latents(batch, generator=None)
        batch_size, T = z.shape[0], self.schedule.num_train_timesteps
        generator = torch.Generator().manual_seed(1_000 + batch_idx)
        t = ((torch.arange(batch_size) + 0.5) * T / batch_size).long().to(z.device)
        noise = torch.randn(z.shape, generator=generator).to(z)
        losses = diffusion_loss(
            self.unet, self.schedule, z, batch["text_hidden_states"], t=t, noise=noise
        )
        return losses, t

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses, t = self.validation_losses(batch, batch_idx)
        self.log("val/loss", losses.mean(), prog_bar=True, batch_size=losses.shape[0])
        self._log_bucketed("val", losses, t)

    def sampling_pipeline(self) -> LatentDiffusionPipeline:
        if self._frozen.vae is None:
            raise RuntimeError("attach_frozen_inputs(...) must be called before sampling")
        return LatentDiffusionPipeline(
            unet=self.unet,
            vae=self._frozen.vae,
            text_encoder=None,
            schedule=self.schedule,
            latent_scale=self.latent_scale,
            latent_shape=tuple(self.hparams.latent_shape),
            context_length=self.hparams.context_length,
            device=self.device,
        )

    @torch.no_grad()
    def log_images(self, batch: Any = None) -> dict[str, Tensor]:
        """Sample grids for the fixed prompts with the raw and the EMA weights."""
        options = SamplingOptions(**self.validation["sampling"])
        seeds = [self.validation["seed"] + i for i in range(len(self.sample_prompts))]
        pipeline = self.sampling_pipeline()
        uncond = self.empty_context
        raw = pipeline.generate_from_context(self.sample_context, uncond, seeds, options)
        with self.ema.swapped_in(self.unet):
            ema = pipeline.generate_from_context(self.sample_context, uncond, seeds, options)
        return {"samples_raw": raw, "samples_ema": ema}

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(
            self.unet.parameters(), self.hparams.optim, int(self.trainer.estimated_stepping_batches)
        )
