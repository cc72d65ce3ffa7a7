"""Reverse-process steps: from x_t and one model output to a less noisy x_{t_prev}.

Every ``step`` is a pure function of (model output, t, t_prev, sample) — plus, for the multistep
solver, the ``StepOutput`` of the step before and, for stochastic samplers, a generator.
``t_prev`` is the next, less noisy timestep (diffusers' "previous timestep"); ``t_prev = -1``
marks the final step to the clean end of the chain, where ᾱ = 1.

With identical betas and timesteps each sampler matches a diffusers scheduler step for step
(tests/test_diffusion_samplers_oracle.py); the options that make diffusers behave like us are

* ``DDPMSampler``: ``DDPMScheduler(variance_type="fixed_small", clip_sample=False,
  timestep_spacing="trailing")``.
* ``DDIMSampler``: ``DDIMScheduler(clip_sample=False, set_alpha_to_one=True, steps_offset=0,
  timestep_spacing="trailing")``, ``step(..., eta=eta)``. diffusers steps back by a fixed
  ``T // steps``; we step to the next timestep of the grid, which is the same whenever ``steps``
  divides T and stays on the grid when it does not.
* ``DPMSolverPP2MSampler``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
  solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
  timestep_spacing="trailing")``.

All three use ``timestep_spacing="trailing"`` and no clipping or thresholding (latents are not
bounded to [-1, 1]); ``trained_betas`` gives diffusers our exact β.

Timesteps are Python ints and every coefficient a Python float from the schedule's host copy, so
a step only launches device work: no step reads a value back from the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from ldm.diffusion.noise import Generators, standard_normal
from ldm.diffusion.schedule import NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


@dataclass(frozen=True)
class StepOutput:
    """One reverse step: the new sample, the x0 it was aimed at, and the timestep it left."""

    sample: Tensor
    pred_x0: Tensor
    timestep: int


class Sampler(Protocol):
    """What the sampling loop needs: one reverse step at a time."""

    def step(
        self,
        model_output: Tensor,
        t: int,
        t_prev: int,
        sample: Tensor,
        *,
        last_step: StepOutput | None = None,
        generator: Generators = None,
    ) -> StepOutput: ...


class DDPMSampler:
    """Ancestral sampling (Ho et al. 2020): draw x_{t_prev} from q(x_{t_prev} | x_t, x̂0).

    Over all T steps this is the original DDPM; over a strided subset the same posterior is taken
    between non-adjacent timesteps, with the "fixed small" (posterior) variance.
    """

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule

    def posterior_mean_variance(
        self, pred_x0: Tensor, sample: Tensor, t: int, t_prev: int
    ) -> tuple[Tensor, float]:
        """Mean and variance of q(x_{t_prev} | x_t = sample, x0 = pred_x0)."""
        alpha_bar, alpha_bar_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_prev)
        alpha = alpha_bar / alpha_bar_prev  # ᾱ_t/ᾱ_{t_prev}: one "α" across the skipped steps
        mean = (math.sqrt(alpha_bar_prev) * (1 - alpha) / (1 - alpha_bar)) * pred_x0 + (
            math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)
        ) * sample
        return mean, _posterior_variance(alpha_bar, alpha_bar_prev)

    def step(
        self,
        model_output: Tensor,
        t: int,
        t_prev: int,
        sample: Tensor,
        *,
        last_step: StepOutput | None = None,
        generator: Generators = None,
    ) -> StepOutput:
        pred_x0, _ = self.schedule.x0_and_epsilon(model_output, sample, t)
        mean, variance = self.posterior_mean_variance(pred_x0, sample, t, t_prev)
        if variance > 0:
            mean = mean + math.sqrt(variance) * _standard_normal_like(sample, generator)
        return StepOutput(sample=mean, pred_x0=pred_x0, timestep=t)


class DDIMSampler:
    """DDIM (Song et al. 2021): deterministic for eta = 0, DDPM-like noise for eta = 1."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0) -> None:
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 <= eta <= 1:
            raise ValueError(
                f"eta={eta!r} is outside [0, 1]: 0 gives deterministic DDIM, "
                "1 the DDPM noise level."
            )
        self.schedule = schedule
        self.eta = float(eta)

    def step(
        self,
        model_output: Tensor,
        t: int,
        t_prev: int,
        sample: Tensor,
        *,
        last_step: StepOutput | None = None,
        generator: Generators = None,
    ) -> StepOutput:
        alpha_bar, alpha_bar_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_prev)
        pred_x0, pred_epsilon = self.schedule.x0_and_epsilon(model_output, sample, t)
        noise_std = self.eta * math.sqrt(_posterior_variance(alpha_bar, alpha_bar_prev))
        # max(…, 0): at eta = 1 the two terms cancel up to rounding.
        direction = math.sqrt(max(1 - alpha_bar_prev - noise_std**2, 0.0))
        new_sample = math.sqrt(alpha_bar_prev) * pred_x0 + direction * pred_epsilon
        if noise_std > 0:
            new_sample = new_sample + noise_std * _standard_normal_like(sample, generator)
        return StepOutput(sample=new_sample, pred_x0=pred_x0, timestep=t)


class DPMSolverPP2MSampler:
    """DPM-Solver++(2M) (Lu et al. 2022): second order in log-SNR, good in 15-25 steps.

    Each step is a DDIM step whose x0 estimate is extrapolated linearly in λ = log(α/σ) from this
    step's and the last step's x0 predictions. The first step (no history) and the final step to
    the clean end (λ = ∞) are plain first-order DDIM steps.
    """

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule

    def step(
        self,
        model_output: Tensor,
        t: int,
        t_prev: int,
        sample: Tensor,
        *,
        last_step: StepOutput | None = None,
        generator: Generators = None,
    ) -> StepOutput:
        alpha_bar, alpha_bar_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_prev)
        pred_x0, _ = self.schedule.x0_and_epsilon(model_output, sample, t)

        x0_estimate = pred_x0
        if last_step is not None and t_prev != -1:
            if last_step.timestep <= t:
                raise ValueError(
                    f"last_step left t={last_step.timestep}, which does not precede t={t}; "
                    "pass the StepOutput of the step just before this one."
                )
            lambda_now = _half_log_snr(alpha_bar)
            step_size = _half_log_snr(alpha_bar_prev) - lambda_now
            last_step_size = lambda_now - _half_log_snr(self.schedule.alpha_bar(last_step.timestep))
            slope = (pred_x0 - last_step.pred_x0) / last_step_size
            x0_estimate = pred_x0 + 0.5 * step_size * slope

        # The DDIM (first-order) update; exact if x0 stayed constant over the step.
        noise_ratio = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        x0_weight = math.sqrt(alpha_bar_prev) - noise_ratio * math.sqrt(alpha_bar)
        new_sample = noise_ratio * sample + x0_weight * x0_estimate
        return StepOutput(sample=new_sample, pred_x0=pred_x0, timestep=t)


def make_sampler(name: str, schedule: NoiseSchedule, *, eta: float = 0.0) -> Sampler:
    """The sampler called ``name`` (one of ``SAMPLERS``); ``eta`` applies to DDIM only."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is not supported; choose one of {', '.join(SAMPLERS)}.")
    if name == "ddim":
        return DDIMSampler(schedule, eta=eta)
    if eta != 0:
        raise ValueError(
            f"eta={eta} only applies to sampler='ddim', but sampler={name!r}; "
            "drop eta or switch to ddim (eta=1 there is DDPM-like)."
        )
    return DDPMSampler(schedule) if name == "ddpm" else DPMSolverPP2MSampler(schedule)


def _half_log_snr(alpha_bar: float) -> float:
    """λ = log(α/σ) = ½·log(ᾱ/(1-ᾱ)); -∞ at zero terminal SNR, where the extrapolation vanishes."""
    if alpha_bar == 0:
        return -math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def _posterior_variance(alpha_bar: float, alpha_bar_prev: float) -> float:
    """Variance of q(x_{t_prev} | x_t, x0): DDPM's β̃, zero on the step to the clean end."""
    return (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)


def _standard_normal_like(sample: Tensor, generator: Generators) -> Tensor:
    return standard_normal(sample.shape, generator, device=sample.device, dtype=sample.dtype)
