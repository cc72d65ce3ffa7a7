"""The one sampling loop that validation images and ``sample.py`` both run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import GuidanceInterval, guided_prediction
from ldm.diffusion.noise import Generators, standard_normal
from ldm.diffusion.objectives import Schedule
from ldm.diffusion.samplers import StepOutput, make_sampler
from ldm.diffusion.timesteps import timesteps_for_strength


@torch.no_grad()
def sample(
    model: Denoiser,
    schedule: Schedule,
    sampler: str,
    *,
    steps: int,
    cond: Any,
    shape: Sequence[int] | None = None,
    init_latent: Tensor | None = None,
    uncond: Tensor | None = None,
    cfg_scale: float = 1.0,
    guidance_interval: GuidanceInterval | None = None,
    eta: float = 0.0,
    strength: float = 1.0,
    generator: Generators = None,
    progress: bool = False,
) -> Tensor:
    """Denoise from pure noise of ``shape``, or img2img from ``init_latent`` — give exactly one.

    Runs on ``schedule.device`` in ``schedule.dtype`` (``schedule.to(dtype=torch.float64)`` for
    exact comparisons); ``generator`` (one, or one per image) must live on that device. The
    model should already be in eval mode. ``sampler`` is one of the schedule's objective's
    ``SAMPLERS_BY_OBJECTIVE``; the schedule spreads ``steps`` noise levels (integer t for ddpm,
    σ for flow matching) and ``strength`` < 1 (img2img only) runs just their tail. Outside
    ``guidance_interval`` (None: everywhere) a level is sampled without guidance, in one call.
    The options are trusted: they were checked where they entered (``SamplingOptions.checked``).
    """
    if (shape is None) == (init_latent is None):
        raise ValueError(
            "give exactly one of shape (start from pure noise) or init_latent (img2img); "
            f"got shape={shape} and init_latent={'a tensor' if init_latent is not None else None}."
        )
    step_rule = make_sampler(sampler, schedule, eta=eta)
    # Python numbers: the loop below only launches device work and never reads a device value
    # back (that would stall the host on every step).
    levels = timesteps_for_strength(schedule.sampling_levels(steps), strength)
    next_levels = [*levels[1:], schedule.clean_level]
    device, dtype = schedule.device, schedule.dtype

    if init_latent is None:
        x = standard_normal(shape, generator, device=device, dtype=dtype)
    else:
        start = init_latent.to(device=device, dtype=dtype)
        noise = standard_normal(start.shape, generator, device=device, dtype=dtype)
        x = schedule.q_sample(start, levels[0], noise)

    def predict(latents: Tensor, level: float) -> Tensor:
        # An int level stays an integer (long) timestep; a σ becomes float32, then σ·T.
        level_batch = torch.full((latents.shape[0],), level, device=device)
        timesteps = schedule.model_timesteps(level_batch)
        guided = guidance_interval is None or guidance_interval.applies(
            schedule.noise_to_signal(level)
        )
        scale = cfg_scale if guided else 1.0
        return guided_prediction(model, latents, timesteps, cond, uncond, scale).to(dtype)

    last_step: StepOutput | None = None
    for level, next_level in zip(
        tqdm(levels, desc=f"sampling ({sampler})", disable=not progress, dynamic_ncols=True),
        next_levels,
        strict=True,
    ):
        last_step = step_rule.advance(
            predict, x, level, next_level, last_step=last_step, generator=generator
        )
        x = last_step.sample
    return x
