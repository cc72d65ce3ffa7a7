"""The training objective: what the model must predict and how much each noise level counts.

Both objectives go through the same functions: a ddpm ``NoiseSchedule`` takes integer timesteps
t, a ``FlowMatchingSchedule`` continuous σ; "noise level" below means either.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.config import ScheduleConfig
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.flow_matching import FlowMatchingSchedule
from ldm.diffusion.schedule import NoiseSchedule, betas_from_config

Schedule = NoiseSchedule | FlowMatchingSchedule


def make_schedule(
    config: ScheduleConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Schedule:
    """The schedule of ``config.objective``: where training and sampling pick the objective."""
    kind = FlowMatchingSchedule if config.objective == "flow_matching" else NoiseSchedule
    return kind(config, device=device, dtype=dtype)


def training_target(schedule: Schedule, x0: Tensor, level: Tensor, noise: Tensor) -> Tensor:
    """The exact output a perfect model would give: ε or v (ddpm), the velocity ε - x0 (flow)."""
    if isinstance(schedule, FlowMatchingSchedule):
        return schedule.velocity(x0, noise)
    if schedule.prediction_type == "v_prediction":
        return schedule.velocity(x0, level, noise)
    return noise


def training_noise(
    config: ScheduleConfig,
    noise: Tensor,
    *,
    offset_normals: Tensor | None = None,
    perturbation_normals: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(ε of the target, ε of the noisy input) from a step's standard-normal draws.

    Offset noise (``noise_offset``, diffusers' name) adds offset·N(0, 1) of shape (B, C, 1, 1)
    to ε, in the input and the target alike: plain ε almost never shifts a whole channel, so a
    model trained on it cannot move an image's mean brightness far (dark or bright images come
    out grey). Input perturbation (``input_perturbation``, Ning et al. 2023) adds γ·N(0, 1) to
    the input's ε only, so training sees inputs as slightly off as sampling's own, against
    exposure bias; the target stays the ε that was not perturbed. Each option needs its draws
    (``offset_normals`` (B, C, 1, 1), ``perturbation_normals`` shaped like ``noise``).
    """
    if config.noise_offset > 0:
        if offset_normals is None:
            raise ValueError(
                f"diffusion.noise_offset={config.noise_offset} needs offset_normals (B, C, 1, 1)."
            )
        noise = noise + config.noise_offset * offset_normals
    if config.input_perturbation <= 0:
        return noise, noise
    if perturbation_normals is None:
        raise ValueError(
            f"diffusion.input_perturbation={config.input_perturbation} needs "
            "perturbation_normals shaped like the noise."
        )
    return noise, noise + config.input_perturbation * perturbation_normals


def loss_weights(schedule: Schedule, level: Tensor) -> Tensor:
    """Per-sample weight (B,) on the squared error at noise levels ``level``.

    Flow matching weighs every σ alike: how often each σ is drawn (logit-normal, shifted) is its
    weighting.

    min-SNR-γ (Hang et al. 2023) caps the weight of nearly clean timesteps, which otherwise
    dominate the gradient: min(SNR, γ)/SNR on an ε target. A v target's error already carries a
    factor SNR + 1, so its weight is min(SNR + 1, γ)/(SNR + 1), as in diffusers' training
    scripts: 1 at zero terminal SNR, where min(SNR, γ)/(SNR + 1) would be 0 and leave the very
    timestep sampling starts from untrained.
    """
    if isinstance(schedule, FlowMatchingSchedule):
        return torch.ones(level.shape, device=level.device)
    return _weight_table(schedule.config, level.device)[level]


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
    schedule: Schedule,
    x0: Tensor,
    cond: Any,
    *,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Per-sample training loss (B,) for clean latents ``x0`` (B, C, H, W).

    Draws the noise levels ``t`` (ddpm: t ~ U{0..T-1}; flow matching: logit-normal σ) and
    ε ~ N(0, I) from ``generator`` unless given, so validation can fix them and get a comparable
    number every epoch. Reduce with ``.mean()`` for the optimiser. Checks what it is given; the
    training step, whose draws come from the data loader, calls :func:`per_sample_loss`.
    """
    batch = x0.shape[0]
    if t is None:
        t = _draw_levels(schedule, batch, generator, x0.device)
    elif isinstance(schedule, FlowMatchingSchedule):
        _check_sigmas(t, batch)
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
    model: Denoiser,
    schedule: Schedule,
    x0: Tensor,
    cond: Any,
    level: Tensor,
    noise: Tensor,
    *,
    input_noise: Tensor | None = None,
) -> Tensor:
    """The loss (B,) with nothing checked that would read the device: the hot path.

    ``input_noise`` (see :func:`training_noise`) replaces ``noise`` in the model's input only.
    """
    noisy = schedule.q_sample(x0, level, noise if input_noise is None else input_noise)
    prediction = model(noisy, schedule.model_timesteps(level), cond)
    if prediction.shape != x0.shape:
        raise ValueError(
            f"the model returned shape {tuple(prediction.shape)} for input {tuple(x0.shape)}; "
            "a denoiser must return a tensor shaped like its input."
        )
    target = training_target(schedule, x0, level, noise)
    # float32 even under bf16 autocast: the squared error of small residuals underflows otherwise.
    squared_error = (prediction.float() - target.float()) ** 2
    return loss_weights(schedule, level) * squared_error.mean(dim=tuple(range(1, x0.ndim)))


def _draw_levels(
    schedule: Schedule, batch: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    if isinstance(schedule, FlowMatchingSchedule):
        return schedule.training_sigmas(torch.randn(batch, generator=generator, device=device))
    return torch.randint(
        0, schedule.num_train_timesteps, (batch,), generator=generator, device=device
    )


def _check_sigmas(sigma: Tensor, batch: int) -> None:
    if sigma.shape != (batch,) or not sigma.is_floating_point():
        raise ValueError(
            f"flow matching takes σ as a float tensor of shape ({batch},), one per sample; got "
            f"shape {tuple(sigma.shape)} and dtype {sigma.dtype}."
        )
    if bool((sigma < 0).any() or (sigma > 1).any()):
        raise ValueError(
            f"σ must lie in [0, 1]; got values from {float(sigma.min())} to {float(sigma.max())}."
        )


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
