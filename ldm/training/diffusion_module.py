"""The Lightning module that trains the text-conditional U-Net on cached latents (stage 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldm.data.batch_randomness import StepRandomness
from ldm.diffusion import (
    FlowMatchingSchedule,
    ScheduleConfig,
    make_schedule,
    per_sample_loss,
    training_noise,
)
from ldm.exports import CHECKPOINT_EXPORT_KEY, UNetExport
from ldm.latent_norm import LatentNormalizer
from ldm.models.denoiser import DEFAULT_DENOISER, build_denoiser
from ldm.models.vae import VAE
from ldm.pipeline import LatentDiffusionPipeline, SamplingOptions
from ldm.training.ema import EMA
from ldm.training.fast_module import FastTrainingModule
from ldm.training.optim import build_optimizer
from ldm.training.step_metrics import MetricWindow


def timestep_buckets(levels: Tensor, level_range: float, num_buckets: int) -> Tensor:
    """Bucket index of each noise level: equal-width slices of [0, level_range) — integer
    timesteps in [0, T), or flow matching's σ in [0, 1] (σ = 1 joins the last slice)."""
    buckets = torch.div(levels * num_buckets, level_range, rounding_mode="floor")
    return buckets.long().clamp_(max=num_buckets - 1)


def bucket_sums(losses: Tensor, levels: Tensor, level_range: float, num_buckets: int) -> tuple:
    """Per-bucket loss sums and sample counts (each (K,)), with no data-dependent shapes."""
    buckets = timestep_buckets(levels, level_range, num_buckets)
    sums = losses.new_zeros(num_buckets).index_add_(0, buckets, losses.detach().float())
    counts = losses.new_zeros(num_buckets).index_add_(0, buckets, torch.ones_like(losses))
    return sums, counts


def bucket_name(bucket: int, level_range: float, num_buckets: int) -> str:
    """``t000-049`` for the timesteps of [0, T) (an int range), ``sigma0.00-0.25`` for σ."""
    if isinstance(level_range, int):
        low = bucket * level_range // num_buckets
        high = (bucket + 1) * level_range // num_buckets - 1
        return f"t{low:03d}-{high:03d}"
    return f"sigma{bucket / num_buckets:.2f}-{(bucket + 1) / num_buckets:.2f}"


@dataclass
class _FrozenModels:
    """Holds frozen models outside ``nn.Module`` registration: never trained, never saved."""

    vae: VAE | None = None


class LatentDiffusionModule(FastTrainingModule):
    """ε/v-prediction or flow-matching training with condition dropout, EMA, warmup + cosine LR.

    Batches come from the latent cache: posterior mean and std of each image, the cached text
    hidden states of one caption, and the step's random numbers (:meth:`step_randomness`,
    drawn by the loader): ε for a fresh z = μ + σ·ε, the noise levels (timesteps, or the
    normals of flow matching's σ), the diffusion noise, which captions to drop, and the draws of
    the training-noise options. The frozen VAE and text encoder are never children of this module,
    so they are never trained and never saved in its checkpoints; the VAE is attached only for
    sample grids.
    """

    def __init__(
        self,
        *,
        unet: dict[str, Any],
        denoiser: str = DEFAULT_DENOISER,
        diffusion: dict[str, Any],
        optim: dict[str, Any],
        ema: dict[str, Any],
        cond_dropout: float,
        latent_norm: dict[str, Any],
        latent_shape: list[int],
        context_length: int,
        validation: dict[str, Any],
        provenance: dict[str, Any],
        seed: int = 0,
        compile_mode: str = "none",
        fused_optimizer: bool = False,
        max_consecutive_nonfinite: int | None = 10,
    ) -> None:
        super().__init__(
            compile_mode=compile_mode,
            fused_optimizer=fused_optimizer,
            max_consecutive_nonfinite=max_consecutive_nonfinite,
        )
        if not 0 <= cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        self.save_hyperparameters()
        # The denoiser (``unet``: the U-Net, ``dit``: the transformer) built from ``unet``, its
        # config section; attribute and argument keep the name ``unet`` for either kind.
        self.unet = build_denoiser(denoiser, unet)
        self.ema = EMA(self.unet, **ema)
        self.schedule = make_schedule(ScheduleConfig(**diffusion))
        self.cond_dropout = cond_dropout
        # VAE latents → the U-Net's space (``LatentNormalizer.describe()``; on the module's device)
        self.latent_normalizer = LatentNormalizer(latent_norm, latent_channels=latent_shape[0])
        self.seed = seed
        self.validation = validation
        try:  # checked now, not at the first sample grid an epoch into training
            self.sampling_options = SamplingOptions.checked(
                diffusion=self.schedule.config, **validation.get("sampling", {})
            )
        except ValueError as error:
            raise ValueError(f"validation.sampling: {error}") from None
        context_dim = self.unet.config.context_dim
        # Text hidden states of the empty prompt: what dropped captions are replaced by.
        self.register_buffer("empty_context", torch.zeros(1, context_length, context_dim))
        self.register_buffer(
            "sample_context", torch.zeros(0, context_length, context_dim), persistent=False
        )
        self.sample_prompts: list[str] = []
        self._frozen = _FrozenModels()
        self._training_losses = self.compiled(self._losses)
        self._val_window = MetricWindow()
        self._train_bucket_names = self._bucket_names("train")

    @property
    def trained(self) -> torch.nn.Module:
        return self.unet

    def step_randomness(self, train: bool) -> StepRandomness:
        """What the loader draws with each batch: everything for training; for validation only
        the noise (its noise levels are spread evenly, its latents are posterior means, and it
        measures the plain objective, without the training-noise options)."""
        latent_shape = tuple(self.hparams.latent_shape)
        if not train:
            return StepRandomness(diffusion_noise_shape=latent_shape)
        config, flow = self.schedule.config, isinstance(self.schedule, FlowMatchingSchedule)
        return StepRandomness(
            posterior_noise_shape=latent_shape,
            num_timesteps=None if flow else self.schedule.num_train_timesteps,
            timestep_normals=flow,
            diffusion_noise_shape=latent_shape,
            cond_dropout=self.cond_dropout,
            offset_noise_shape=(latent_shape[0], 1, 1) if config.noise_offset > 0 else None,
            perturbation_noise_shape=latent_shape if config.input_perturbation > 0 else None,
        )

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

    def _losses(
        self,
        latent_mean: Tensor,
        latent_std: Tensor,
        posterior_noise: Tensor,
        text_hidden_states: Tensor,
        drop_condition: Tensor,
        levels: Tensor,
        noise: Tensor,
        offset_noise: Tensor | None = None,
        perturbation_noise: Tensor | None = None,
    ) -> Tensor:
        """Per-sample loss (B,) of one training batch: what ``trainer.compile`` compiles.

        ``levels`` are the noise levels (t, or σ: :meth:`_training_levels`); ``offset_noise``
        and ``perturbation_noise`` the draws of the training-noise options that are on."""
        z = self.latent_normalizer.normalize(
            latent_mean.float() + latent_std.float() * posterior_noise
        )
        context = text_hidden_states.to(self.empty_context.dtype)
        # Condition dropout: the empty prompt's states in place of a dropped caption (for CFG).
        context = torch.where(drop_condition[:, None, None], self.empty_context, context)
        target_noise, input_noise = training_noise(
            self.schedule.config,
            noise,
            offset_normals=offset_noise,
            perturbation_normals=perturbation_noise,
        )
        return per_sample_loss(
            self.unet, self.schedule, z, context, levels, target_noise, input_noise=input_noise
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        levels = self._training_levels(batch)
        losses = self._training_losses(
            batch["latent_mean"],
            batch["latent_std"],
            batch["posterior_noise"],
            batch["text_hidden_states"],
            batch["drop_condition"],
            levels,
            batch["diffusion_noise"],
            batch.get("offset_noise"),
            batch.get("perturbation_noise"),
        )
        loss = losses.mean()
        self.window.add("train/loss", loss)
        self.window.add(self._train_bucket_names, *self._bucket_sums(losses, levels))
        return loss

    def _training_levels(self, batch: dict[str, Any]) -> Tensor:
        """The batch's noise levels (B,): its drawn timesteps, or flow matching's σ made from
        its drawn normals (logit-normal, shifted)."""
        if isinstance(self.schedule, FlowMatchingSchedule):
            return self.schedule.training_sigmas(batch["timestep_normals"])
        return batch["timesteps"]

    def _validation_levels(self, batch_size: int, device: torch.device) -> Tensor:
        """Fixed noise levels (B,): the midpoints of B equal slices of [0, T), or of σ's [0, 1]."""
        positions = torch.arange(batch_size, device=device) + 0.5
        if isinstance(self.schedule, FlowMatchingSchedule):
            return positions / batch_size
        return (positions * self.schedule.num_train_timesteps / batch_size).long()

    @property
    def _level_range(self) -> int | float:
        """Where noise levels lie: integer timesteps in [0, T), or σ in [0, 1]."""
        if isinstance(self.schedule, FlowMatchingSchedule):
            return 1.0
        return self.schedule.num_train_timesteps

    def _bucket_sums(self, losses: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
        return bucket_sums(losses, levels, self._level_range, self.validation["timestep_buckets"])

    def _bucket_names(self, stage: str) -> tuple[str, ...]:
        level_range, num_buckets = self._level_range, self.validation["timestep_buckets"]
        return tuple(
            f"{stage}/loss_{bucket_name(b, level_range, num_buckets)}" for b in range(num_buckets)
        )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Update the EMA right after each optimizer step: once per step under gradient
        accumulation, and before ``on_train_batch_end``, where checkpoints are written."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.unet)

    def host_metrics(self) -> dict[str, float]:
        return {"train/ema_decay": self.ema.decay}

    def validation_losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Per-sample loss and noise level at fixed levels (spread over [0, T), or σ over
        [0, 1]) from the posterior mean, with noise fixed by the batch's images: the same number
        for the same weights, run after run. The training-noise options are left out."""
        z = self.latent_normalizer.normalize(batch["latent_mean"].float())
        levels = self._validation_levels(z.shape[0], z.device)
        context = batch["text_hidden_states"].to(self.empty_context.dtype)
        noise = batch["diffusion_noise"]
        losses = per_sample_loss(self.unet, self.schedule, z, context, levels, noise)
        return losses, levels

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses, levels = self.validation_losses(batch)
        # Averaged over the processes' shards at the epoch's end (not per step).
        self.log(
            "val/loss", losses.mean(), prog_bar=True, batch_size=losses.shape[0], sync_dist=True
        )
        self._val_window.add(self._bucket_names("val"), *self._bucket_sums(losses, levels))

    def on_validation_epoch_end(self) -> None:
        if not self._val_window:
            return
        for name, value in self._val_window.read_means(self.sum_over_processes).items():
            # Already exact over all processes and identical in each, so every process skips
            # the same empty buckets; sync_dist=True only averages equal values (and tells
            # Lightning that this epoch metric is a global one).
            if not torch.isnan(value):
                self.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    def sampling_pipeline(self) -> LatentDiffusionPipeline:
        if self._frozen.vae is None:
            raise RuntimeError("attach_frozen_inputs(...) must be called before sampling")
        return LatentDiffusionPipeline(
            unet=self.unet,
            vae=self._frozen.vae,
            text_encoder=None,
            schedule=self.schedule,
            latent_normalizer=self.latent_normalizer,
            latent_shape=tuple(self.hparams.latent_shape),
            context_length=self.hparams.context_length,
            device=self.device,
        )

    @torch.no_grad()
    def log_images(self, batch: Any = None) -> dict[str, Tensor]:
        """Sample grids for the fixed prompts with the raw and the EMA weights."""
        seeds = [self.validation["seed"] + i for i in range(len(self.sample_prompts))]
        pipeline = self.sampling_pipeline()
        context, uncond, options = self.sample_context, self.empty_context, self.sampling_options
        raw = pipeline.generate_from_context(context, uncond, seeds, options)
        with self.ema.swapped_in(self.unet):
            ema = pipeline.generate_from_context(context, uncond, seeds, options)
        return {"samples_raw": raw, "samples_ema": ema}

    def export(self) -> UNetExport:
        """The U-Net export of the current raw and EMA weights, with everything sampling needs:
        what the stage runner writes into ``export/`` and every checkpoint carries."""
        hparams = self.hparams
        description = {
            "diffusion": hparams.diffusion,
            "latent_norm": self.latent_normalizer.describe(),
            "latent_shape": list(hparams.latent_shape),
            "context_length": hparams.context_length,
            **hparams.provenance,  # the VAE export and its fingerprint, text encoder, image size
            "cond_dropout": self.cond_dropout,
            "ema_steps": self.ema.steps_seen,
            "seed": self.seed,
        }
        return UNetExport.from_models(raw=self.unet, ema=self.ema.module, description=description)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Carry the export, so a checkpoint samples like an export folder. Its state dicts
        share their tensors with ``checkpoint["state_dict"]``, which torch.save stores once."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_EXPORT_KEY] = self.export().as_checkpoint_entry()

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(
            self.unet.parameters(),
            self.hparams.optim,
            int(self.trainer.estimated_stepping_batches),
            fused=self.fused_optimizer,
        )
