"""Our samplers against diffusers' schedulers: same betas, same timesteps, same steps (float64).

diffusers is the oracle only. Each test feeds both implementations identical (model output, t,
sample) at every step and compares the results, so a mismatch points at the step that broke.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ldm.diffusion import (
    PREDICTION_TYPES,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    NoiseSchedule,
    ScheduleConfig,
    sample,
    sampling_timesteps,
)

TOLERANCE = {"atol": 1e-5, "rtol": 0.0}
SHAPE = (2, 3, 4, 4)

# diffusers turns its float64 ᾱ into sigmas through np.array(tensor), which NumPy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def float64_schedule(prediction_type: str = "epsilon") -> NoiseSchedule:
    config = ScheduleConfig(prediction_type=prediction_type, rescale_zero_terminal_snr=False)
    return NoiseSchedule(config, dtype=torch.float64)


def diffusers_twin(scheduler_class, schedule: NoiseSchedule, **options):
    """A diffusers scheduler with our exact betas, configured to behave like our sampler."""
    oracle = scheduler_class(
        num_train_timesteps=schedule.num_train_timesteps,
        trained_betas=schedule.betas.tolist(),
        prediction_type=schedule.prediction_type,
        timestep_spacing="trailing",
        **options,
    )
    # trained_betas are stored as float32; hand over our float64 ᾱ so that both sides compute
    # in float64 and the comparison can be tight.
    oracle.betas = schedule.betas.clone()
    oracle.alphas = schedule.alphas.clone()
    oracle.alphas_cumprod = schedule.alphas_cumprod.clone()
    return oracle


def ddpm_twin(schedule: NoiseSchedule) -> DDPMScheduler:
    return diffusers_twin(DDPMScheduler, schedule, variance_type="fixed_small", clip_sample=False)


def ddim_twin(schedule: NoiseSchedule) -> DDIMScheduler:
    return diffusers_twin(
        DDIMScheduler, schedule, clip_sample=False, set_alpha_to_one=True, steps_offset=0
    )


def dpm_solver_twin(schedule: NoiseSchedule) -> DPMSolverMultistepScheduler:
    return diffusers_twin(
        DPMSolverMultistepScheduler,
        schedule,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_tensor(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=seeded(seed), dtype=torch.float64)


def plausible_model_output(schedule: NoiseSchedule, x: torch.Tensor, t: int, seed: int):
    """A slightly wrong prediction of one fixed x0, so samples stay at the scale of real latents."""
    x0 = random_tensor(-1)
    epsilon = schedule.epsilon_from_x0(x, t, x0)
    target = (
        schedule.velocity(x0, t, epsilon) if schedule.prediction_type == "v_prediction" else epsilon
    )
    return target + 0.1 * random_tensor(seed)


def transitions(timesteps: torch.Tensor) -> list[tuple[int, int]]:
    """(t, t_prev) for every step of the grid; t_prev = -1 is the clean end."""
    current = timesteps.tolist()
    return list(zip(current, [*current[1:], -1], strict=True))


@pytest.mark.parametrize("steps", [1, 7, 16, 20, 30, 50, 200])
def test_sampling_timesteps_equal_diffusers_trailing_spacing(steps):
    oracle = ddim_twin(float64_schedule())
    oracle.set_timesteps(steps)

    assert sampling_timesteps(200, steps).tolist() == oracle.timesteps.tolist()


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [200, 50, 30, 7])
def test_ddpm_step_matches_diffusers_ddpm_scheduler(steps, prediction_type):
    schedule = float64_schedule(prediction_type)
    oracle, ours = ddpm_twin(schedule), DDPMSampler(schedule)
    oracle.set_timesteps(steps)
    x = random_tensor(0)

    for i, (t, t_prev) in enumerate(transitions(oracle.timesteps)):
        model_output = plausible_model_output(schedule, x, t, seed=1000 + i)
        expected = oracle.step(model_output, t, x, generator=seeded(i))
        got = ours.step(model_output, t, t_prev, x, generator=seeded(i))

        torch.testing.assert_close(got.pred_x0, expected.pred_original_sample, **TOLERANCE)
        torch.testing.assert_close(got.sample, expected.prev_sample, **TOLERANCE)
        x = got.sample


@pytest.mark.parametrize("steps", [200, 30])
def test_ddpm_posterior_variance_matches_diffusers(steps):
    schedule = float64_schedule()
    oracle, ours = ddpm_twin(schedule), DDPMSampler(schedule)
    oracle.set_timesteps(steps)
    x, pred_x0 = random_tensor(0), random_tensor(1)

    for t, t_prev in transitions(oracle.timesteps):
        _, variance = ours.posterior_mean_variance(pred_x0, x, t, t_prev)

        assert variance == pytest.approx(float(oracle._get_variance(t)), abs=1e-12)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [200, 40, 25, 8, 1])
def test_ddim_step_matches_diffusers_ddim_scheduler(steps, eta, prediction_type):
    # Step counts divide T: diffusers' DDIM steps back by T // steps, we follow the grid.
    schedule = float64_schedule(prediction_type)
    oracle, ours = ddim_twin(schedule), DDIMSampler(schedule, eta=eta)
    oracle.set_timesteps(steps)
    x = random_tensor(0)

    for i, (t, t_prev) in enumerate(transitions(oracle.timesteps)):
        model_output = plausible_model_output(schedule, x, t, seed=1000 + i)
        expected = oracle.step(model_output, t, x, eta=eta, generator=seeded(i))
        got = ours.step(model_output, t, t_prev, x, generator=seeded(i))

        torch.testing.assert_close(got.pred_x0, expected.pred_original_sample, **TOLERANCE)
        torch.testing.assert_close(got.sample, expected.prev_sample, **TOLERANCE)
        x = got.sample


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [25, 20, 15, 10, 7])
def test_dpm_solver_step_matches_diffusers_dpm_solver_multistep(steps, prediction_type):
    schedule = float64_schedule(prediction_type)
    oracle, ours = dpm_solver_twin(schedule), DPMSolverPP2MSampler(schedule)
    oracle.set_timesteps(steps)
    x, last_step = random_tensor(0), None

    for i, (t, t_prev) in enumerate(transitions(oracle.timesteps)):
        model_output = plausible_model_output(schedule, x, t, seed=1000 + i)
        expected = oracle.step(model_output, t, x).prev_sample
        last_step = ours.step(model_output, t, t_prev, x, last_step=last_step)

        torch.testing.assert_close(last_step.sample, expected, **TOLERANCE)
        x = last_step.sample


def toy_denoiser(x: torch.Tensor, t: torch.Tensor, cond: None) -> torch.Tensor:
    """Any smooth function of (x, t) will do: the loop must call it the way diffusers does."""
    return 0.5 * x + torch.sin(t.to(x.dtype) / 50).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize(
    ("sampler", "make_twin", "steps"),
    [("ddpm", ddpm_twin, 50), ("ddim", ddim_twin, 20), ("dpmpp_2m", dpm_solver_twin, 20)],
)
def test_sample_loop_matches_a_diffusers_loop(sampler, make_twin, steps):
    schedule = float64_schedule()
    oracle = make_twin(schedule)
    oracle.set_timesteps(steps)
    generator = seeded(7)
    expected = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    for t in oracle.timesteps:
        model_output = toy_denoiser(expected, t.repeat(SHAPE[0]), None)
        expected = oracle.step(model_output, t, expected, generator=generator).prev_sample

    got = sample(
        toy_denoiser, schedule, sampler, steps=steps, cond=None, shape=SHAPE, generator=seeded(7)
    )

    torch.testing.assert_close(got, expected, **TOLERANCE)
