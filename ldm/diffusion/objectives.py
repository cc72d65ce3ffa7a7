"""The training objective: what the model must predict and how much each timestep counts."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.config import ScheduleConfig
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.schedule import NoiseSchedule, betas_from_config


def training_target(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """The exact output a perfect model would give: ε, or v for v-prediction."""
    if schedule.prediction_type == "v_prediction":
        return schedule.velocity(x0, t, noise)
    return noise


def loss_weights(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """Per-sample weight (B,) on the squared error at timesteps ``t``.

    min-SNR-γ (Hang et al. 2023) caps the weight of nearly clean timesteps, which otherwise
    dominate the gradient: min(SNR, γ)/SNR on an ε target. A v target's error already carries a
    factor SNR + 1, so its weight is min(SNR + 1, γ)/(SNR + 1), as in diffusers' training
    scripts: 1 at zero terminal SNR, where min(SNR, γ)/(SNR + 1) would be 0 and leave the very
    timestep sampling starts from untrained.
    """
    return _weight_table(schedule.config, t.device)[t]


@functools.cache
def _weight_table(config: ScheduleConfig, device: torch.device) -> Tensor:
    """The (T,) float32 weights of every timestep, computed once in float64 on the CPU (MPS has
    no float64) and then placed on ``device``: training only gathers from it."""
    if config.loss_weighting == "mse":
        return torch.ones(config.num_train_timesteps, device=device)
    alphas_cumprod = torch.cumprod(1 - betas_from_config(config), dim=0)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if config.prediction_type == "v_prediction":
        snr = snr + 1
    weights = snr.clamp(max=config.min_snr_gamma) / snr
    return weights.float().to(device)


def diffusion_loss(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    cond: Any,
    *,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Per-sample training loss (B,) for clean latents ``x0`` (B, C, H, W).

    Draws t ~ U{0..T-1} and ε ~ N(0, I) from ``generator`` unless given, so validation can fix
    them and get a comparable number every epoch. Reduce with ``.mean()`` for the optimiser.
    Checks what it is given; the training step, whose t and ε are drawn by the data loader,
    calls :func:`per_sample_loss` directly.
    """
    batch = x0.shape[0]
    if t is None:
        t = torch.randint(
            0, schedule.num_train_timesteps, (batch,), generator=generator, device=x0.device
        )
    else:
        _check_timesteps(t, batch, schedule.num_train_timesteps)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(
            f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}; they must match."
        )
    return per_sample_loss(model, schedule, x0, cond, t, noise)


def per_sample_loss(
    model: Denoiser, schedule: NoiseSchedule, x0: Tensor, cond: Any, t: Tensor, noise: Tensor
) -> Tensor:
    """The loss (B,) with nothing checked that would read the device: the hot path."""
    prediction = model(schedule.q_sample(x0, t, noise), t, cond)
    if prediction.shape != x0.shape:
        raise ValueError(
            f"the model returned shape {tuple(prediction.shape)} for input {tuple(x0.shape)}; "
            "a denoiser must return a tensor shaped like its input."
        )
    target = training_target(schedule, x0, t, noise)
    # float32 even under bf16 autocast: the squared error of small residuals underflows otherwise.
    squared_error = (prediction.float() - target.float()) ** 2
    return loss_weights(schedule, t) * squared_error.mean(dim=tuple(range(1, x0.ndim)))


def _check_timesteps(t: Tensor, batch: int, num_timesteps: int) -> None:
    if t.shape != (batch,) or t.dtype != torch.long:
        raise ValueError(
            f"t must be a LongTensor of shape ({batch},), one timestep per sample; got "
            f"shape {tuple(t.shape)} and dtype {t.dtype}."
        )
    if bool((t < 0).any() or (t >= num_timesteps).any()):
        raise ValueError(
            f"t must lie in [0, {num_timesteps - 1}] (T={num_timesteps}); got values from "
            f"{int(t.min())} to {int(t.max())}."
        )
