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

Flow-matching models (``FlowMatchingSchedule``) have their own two, which integrate the predicted
velocity from σ to σ_next on the grid of ``FlowMatchingSchedule.sampling_levels``:

* ``FlowEulerSampler``: ``FlowMatchEulerDiscreteScheduler(shift=k)`` at eta = 0; eta > 0 adds
  DDIM's noise, carried over to the straight path.
* ``FlowHeunSampler``: ``FlowMatchHeunDiscreteScheduler(shift=k)``, which takes two model calls
  per step (one on the last step, to σ = 0).

Timesteps are Python ints (σ Python floats) and every coefficient a Python float from the
schedule's host copy, so a step only launches device work: no step reads a value back from the
device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ldm.diffusion.flow_matching import FlowMatchingSchedule
from ldm.diffusion.noise import Generators, standard_normal
from ldm.diffusion.schedule import NoiseSchedule

SAMPLERS_BY_OBJECTIVE = {"ddpm": ("ddpm", "ddim", "dpmpp_2m"), "flow_matching": ("euler", "heun")}
SAMPLERS = tuple(name for names in SAMPLERS_BY_OBJECTIVE.values() for name in names)

# The model, guidance included, at one noise level: (x (B, C, H, W), t or σ) -> its output.
Predict = Callable[[Tensor, float], Tensor]


@dataclass(frozen=True)
class StepOutput:
    """One reverse step: the new sample, the x0 it was aimed at, and the noise level it left
    (an integer timestep t, or σ for flow matching)."""

    sample: Tensor
    pred_x0: Tensor
    timestep: float


@dataclass(frozen=True, slots=True)
class StepInputs:
    """What a reverse step from t to t_prev starts from: x_t, the model's x0 and ε estimates,
    ᾱ at both timesteps, the step before (multistep solvers) and the noise generator."""

    sample: Tensor
    pred_x0: Tensor
    pred_epsilon: Tensor
    t: int
    t_prev: int
    alpha_bar: float
    alpha_bar_prev: float
    last_step: StepOutput | None
    generator: Generators


class Sampler(ABC):
    """One reverse step at a time. ``step`` reads what every update needs from the schedule;
    each sampler supplies only its update rule, ``next_sample``."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule

    def advance(
        self,
        predict: Predict,
        sample: Tensor,
        t: int,
        t_prev: int,
        *,
        last_step: StepOutput | None = None,
        generator: Generators = None,
    ) -> StepOutput:
        """One step of the sampling loop: one model call at t, then :meth:`step`."""
        return self.step(
            predict(sample, t), t, t_prev, sample, last_step=last_step, generator=generator
        )

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
        """x_{t_prev} from ``sample`` = x_t and the model's output at t."""
        pred_x0, pred_epsilon = self.schedule.x0_and_epsilon(model_output, sample, t)
        inputs = StepInputs(
            sample,
            pred_x0,
            pred_epsilon,
            t,
            t_prev,
            self.schedule.alpha_bar(t),
            self.schedule.alpha_bar(t_prev),
            last_step,
            generator,
        )
        return StepOutput(sample=self.next_sample(inputs), pred_x0=pred_x0, timestep=t)

    @abstractmethod
    def next_sample(self, step: StepInputs) -> Tensor:
        """The sample at ``step.t_prev``."""


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020): draw x_{t_prev} from q(x_{t_prev} | x_t, x̂0).

    Over all T steps this is the original DDPM; over a strided subset the same posterior is taken
    between non-adjacent timesteps, with the "fixed small" (posterior) variance.
    """

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

    def next_sample(self, step: StepInputs) -> Tensor:
        mean, variance = self.posterior_mean_variance(
            step.pred_x0, step.sample, step.t, step.t_prev
        )
        if variance > 0:
            mean = mean + math.sqrt(variance) * _standard_normal_like(step.sample, step.generator)
        return mean


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021): deterministic for eta = 0, DDPM-like noise for eta = 1."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0) -> None:
        super().__init__(schedule)
        self.eta = float(eta)

    def next_sample(self, step: StepInputs) -> Tensor:
        alpha_bar, alpha_bar_prev = step.alpha_bar, step.alpha_bar_prev
        noise_std = self.eta * math.sqrt(_posterior_variance(alpha_bar, alpha_bar_prev))
        # max(…, 0): at eta = 1 the two terms cancel up to rounding.
        direction = math.sqrt(max(1 - alpha_bar_prev - noise_std**2, 0.0))
        new_sample = math.sqrt(alpha_bar_prev) * step.pred_x0 + direction * step.pred_epsilon
        if noise_std > 0:
            new_sample = new_sample + noise_std * _standard_normal_like(step.sample, step.generator)
        return new_sample


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): second order in log-SNR, good in 15-25 steps.

    Each step is a DDIM step whose x0 estimate is extrapolated linearly in λ = log(α/σ) from this
    step's and the last step's x0 predictions. The first step (no history) and the final step to
    the clean end (λ = ∞) are plain first-order DDIM steps.
    """

    def next_sample(self, step: StepInputs) -> Tensor:
        alpha_bar, alpha_bar_prev, last_step = step.alpha_bar, step.alpha_bar_prev, step.last_step
        x0_estimate = step.pred_x0
        if last_step is not None and step.t_prev != -1:
            if last_step.timestep <= step.t:
                raise ValueError(
                    f"last_step left t={last_step.timestep}, which does not precede t={step.t}; "
                    "pass the StepOutput of the step just before this one."
                )
            lambda_now = _half_log_snr(alpha_bar)
            step_size = _half_log_snr(alpha_bar_prev) - lambda_now
            last_step_size = lambda_now - _half_log_snr(self.schedule.alpha_bar(last_step.timestep))
            slope = (step.pred_x0 - last_step.pred_x0) / last_step_size
            x0_estimate = step.pred_x0 + 0.5 * step_size * slope

        # The DDIM (first-order) update; exact if x0 stayed constant over the step.
        noise_ratio = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        x0_weight = math.sqrt(alpha_bar_prev) - noise_ratio * math.sqrt(alpha_bar)
        return noise_ratio * step.sample + x0_weight * x0_estimate


class FlowSampler(ABC):
    """One step of a flow-matching ODE solver, from σ to σ_next < σ. The model output is the
    velocity v = dx/dσ, so x0 = x_σ - σ·v; ``generator`` draws the noise of a stochastic step."""

    def __init__(self, schedule: FlowMatchingSchedule) -> None:
        self.schedule = schedule

    @abstractmethod
    def advance(
        self,
        predict: Predict,
        sample: Tensor,
        sigma: float,
        sigma_next: float,
        *,
        last_step: StepOutput | None = None,
        generator: Generators = None,
    ) -> StepOutput:
        """The sample at ``sigma_next`` from ``sample`` at ``sigma``."""


class FlowEulerSampler(FlowSampler):
    """Euler: x_{σ_next} = x_σ + (σ_next - σ)·v(x_σ, σ); exact on a straight path.

    With ``eta`` > 0 the step is stochastic, as DDIM's: the path x_σ = (1-σ)·x0 + σ·ε is DDPM's
    x_t scaled by 1/(√ᾱ + √(1-ᾱ)), with ᾱ = (1-σ)²/((1-σ)² + σ²), so DDIM's update carries over:
    x_{σ_next} = (1-σ_next)·x̂0 + σ_next·(√(1-ρ²)·ε̂ + ρ·z), where ρ² = eta²·(1-ᾱ/ᾱ_next)/(1-ᾱ)
    is the share of fresh noise. eta = 1 draws from DDPM's posterior q(x_next | x_σ, x̂0): each
    step re-noises part of what earlier steps got wrong instead of carrying it to σ = 0.
    """

    def __init__(self, schedule: FlowMatchingSchedule, eta: float = 0.0) -> None:
        super().__init__(schedule)
        self.eta = float(eta)

    def advance(
        self,
        predict: Predict,
        sample: Tensor,
        sigma: float,
        sigma_next: float,
        *,
        last_step: StepOutput | None = None,
        generator: Generators = None,
    ) -> StepOutput:
        velocity = predict(sample, sigma)
        pred_x0 = sample - sigma * velocity
        if self.eta == 0 or sigma_next == 0:
            next_sample = sample + (sigma_next - sigma) * velocity
        else:
            pred_epsilon = sample + (1 - sigma) * velocity
            fresh = self.eta**2 * _flow_posterior_share(sigma, sigma_next)
            noise = _standard_normal_like(sample, generator)
            next_sample = (1 - sigma_next) * pred_x0 + sigma_next * (
                math.sqrt(1 - fresh) * pred_epsilon + math.sqrt(fresh) * noise
            )
        return StepOutput(sample=next_sample, pred_x0=pred_x0, timestep=sigma)


class FlowHeunSampler(FlowSampler):
    """Heun (second order, as in Karras et al. 2022): an Euler step, then the step again with the
    mean of the velocities at both ends. The last step, to σ = 0, stays Euler."""

    def advance(
        self,
        predict: Predict,
        sample: Tensor,
        sigma: float,
        sigma_next: float,
        *,
        last_step: StepOutput | None = None,
        generator: Generators = None,
    ) -> StepOutput:
        velocity = predict(sample, sigma)
        slope = velocity
        if sigma_next != 0:
            at_end = predict(sample + (sigma_next - sigma) * velocity, sigma_next)
            slope = 0.5 * (velocity + at_end)
        return StepOutput(
            sample=sample + (sigma_next - sigma) * slope,
            pred_x0=sample - sigma * velocity,
            timestep=sigma,
        )


def make_sampler(
    name: str, schedule: NoiseSchedule | FlowMatchingSchedule, *, eta: float = 0.0
) -> Sampler | FlowSampler:
    """The sampler called ``name`` (one of ``SAMPLERS_BY_OBJECTIVE[schedule.objective]``);
    ``eta`` applies to DDIM and flow Euler only. The options are trusted: they were checked
    where they entered (``SamplingOptions.checked``)."""
    if isinstance(schedule, FlowMatchingSchedule):
        return FlowEulerSampler(schedule, eta=eta) if name == "euler" else FlowHeunSampler(schedule)
    if name == "ddim":
        return DDIMSampler(schedule, eta=eta)
    return {"ddpm": DDPMSampler, "dpmpp_2m": DPMSolverPP2MSampler}[name](schedule)


def _half_log_snr(alpha_bar: float) -> float:
    """λ = log(α/σ) = ½·log(ᾱ/(1-ᾱ)); -∞ at zero terminal SNR, where the extrapolation vanishes."""
    if alpha_bar == 0:
        return -math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def _posterior_variance(alpha_bar: float, alpha_bar_prev: float) -> float:
    """Variance of q(x_{t_prev} | x_t, x0): DDPM's β̃, zero on the step to the clean end."""
    return (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)


def _flow_posterior_share(sigma: float, sigma_next: float) -> float:
    """ρ² of ``FlowEulerSampler`` at eta = 1: DDPM's posterior variance over 1 - ᾱ_next, with
    ᾱ the DDPM noise level that σ of the straight path corresponds to."""
    alpha_bar = (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)
    alpha_bar_next = (1 - sigma_next) ** 2 / ((1 - sigma_next) ** 2 + sigma_next**2)
    return (1 - alpha_bar / alpha_bar_next) / (1 - alpha_bar)


def _standard_normal_like(sample: Tensor, generator: Generators) -> Tensor:
    return standard_normal(sample.shape, generator, device=sample.device, dtype=sample.dtype)
