"""Flow matching (diffusion.objective=flow_matching) and the training-noise options.

diffusers' FlowMatchEuler/HeunDiscreteScheduler are the oracle of the samplers; the rest checks
the objective against its definition: x_σ = (1-σ)·x0 + σ·ε, target ε - x0, σ logit-normal and
shifted, the model told σ·T.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from helpers import (
    TINY_CONTEXT,
    TINY_LATENT_SHAPE,
    TINY_UNET_RUN,
    compose_config,
    save_tiny_vae_export,
    synthetic_run_overrides,
    tiny_diffusion_module,
)

from ldm.data.batch_randomness import StepRandomness
from ldm.diffusion import (
    DDIMSampler,
    FlowEulerSampler,
    FlowHeunSampler,
    FlowMatchingSchedule,
    NoiseSchedule,
    ScheduleConfig,
    make_schedule,
    per_sample_loss,
    sample,
    training_noise,
)
from ldm.diffusion.samplers import StepInputs
from ldm.exports import read_unet_metadata
from ldm.models.unet import UNet, UNetConfig
from ldm.pipeline import SamplingOptions
from ldm.sampling import read_png_metadata, run_sampling
from ldm.training.diffusion_module import bucket_name, timestep_buckets
from ldm.training.unet_stage import run_unet_stage

T = 200
TOLERANCE = {"atol": 1e-5, "rtol": 0.0}  # diffusers steps in float32
SHAPE = (2, 3, 4, 4)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """On a few shared cores, OpenMP threads waiting on each other make these tiny models many
    times slower; one thread keeps the file fast and changes no result the tests check."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flow_config(**changes) -> ScheduleConfig:
    return ScheduleConfig(**({"objective": "flow_matching", "num_train_timesteps": T} | changes))


def flow64(**changes) -> FlowMatchingSchedule:
    return FlowMatchingSchedule(flow_config(**changes), dtype=torch.float64)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_tensor(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=seeded(seed), dtype=torch.float64)


def velocity_field(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact velocity towards one fixed x0, plus a smooth error, so that the samplers'
    two model calls per Heun step see different inputs and both matter."""
    x0 = random_tensor(-1)
    return (x - x0) / sigma + 0.1 * torch.sin(3 * x + sigma)


# ---- the samplers against diffusers ------------------------------------------------------------


def euler_twin(shift: float, steps: int) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' Euler on our grid: it shifts the unshifted σ it is given, as we do. (Its own
    default grid starts from the already shifted 1/T and shifts it again.)"""
    oracle = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    oracle.set_timesteps(sigmas=np.linspace(1, 1 / T, steps))
    return oracle


def heun_twin(shift: float, steps: int) -> FlowMatchHeunDiscreteScheduler:
    """diffusers' Heun on our grid (it takes no σ list: its lowest unshifted σ is set instead)."""
    oracle = FlowMatchHeunDiscreteScheduler(num_train_timesteps=T, shift=shift)
    oracle.sigma_min = 1 / T
    oracle.set_timesteps(steps)
    return oracle


def our_grid(schedule: FlowMatchingSchedule, steps: int) -> list[float]:
    return [*schedule.sampling_levels(steps), schedule.clean_level]


@pytest.mark.parametrize("steps", [1, 7, 20])
def test_the_sigma_grid_is_diffusers_default_grid_without_shift(steps) -> None:
    oracle = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)
    oracle.set_timesteps(steps)

    np.testing.assert_allclose(our_grid(flow64(), steps), oracle.sigmas.numpy(), atol=1e-7)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_euler_matches_diffusers_flow_match_euler_step_for_step(steps, shift) -> None:
    schedule = flow64(flow_shift=shift)
    oracle, ours = euler_twin(shift, steps), FlowEulerSampler(schedule)
    grid = our_grid(schedule, steps)
    np.testing.assert_allclose(grid, oracle.sigmas.numpy(), atol=1e-7)
    x = random_tensor(0)
    seen: list[float] = []

    def predict(x_in, level):
        seen.append(schedule.model_timesteps(torch.tensor(level)).item())
        return velocity_field(x_in, level)

    for i, (sigma, sigma_next) in enumerate(itertools.pairwise(grid)):
        got = ours.advance(predict, x, sigma, sigma_next)
        expected = oracle.step(velocity_field(x, sigma), oracle.timesteps[i], x).prev_sample

        torch.testing.assert_close(got.sample, expected, **TOLERANCE)
        x = expected

    assert seen == pytest.approx(oracle.timesteps.tolist(), abs=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_heun_matches_diffusers_flow_match_heun_step_for_step(steps, shift) -> None:
    """diffusers runs Heun as two scheduler calls per step (one on the last): we compare after
    each whole step, with the same model at the same timesteps."""
    schedule = flow64(flow_shift=shift)
    oracle, ours = heun_twin(shift, steps), FlowHeunSampler(schedule)
    grid = our_grid(schedule, steps)
    oracle_timesteps = oracle.timesteps.tolist()
    x = random_tensor(0)
    seen: list[float] = []

    def predict(x_in, level):
        seen.append(level * T)
        return velocity_field(x_in, level)

    call = 0
    for sigma, sigma_next in itertools.pairwise(grid):
        got = ours.advance(predict, x, sigma, sigma_next)
        expected = x
        for _ in range(1 if sigma_next == 0 else 2):
            timestep = oracle_timesteps[call]
            model_output = velocity_field(expected, timestep / T)
            expected = oracle.step(model_output, oracle.timesteps[call], expected).prev_sample
            call += 1

        torch.testing.assert_close(got.sample, expected, **TOLERANCE)
        x = expected

    assert call == len(oracle_timesteps) == 2 * steps - 1
    assert seen == pytest.approx(oracle_timesteps, abs=1e-4)


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize(("sigma", "sigma_next"), [(1.0, 0.8), (0.6, 0.55), (0.3, 0.05)])
def test_stochastic_euler_is_ddim_on_the_same_path_in_ddpm_scaling(eta, sigma, sigma_next) -> None:
    """The straight path is DDPM's up to a scale: x_σ = r·x_t with √ᾱ = (1-σ)/r and
    √(1-ᾱ) = σ/r. So a stochastic Euler step must be DDIM's step at that ᾱ, scaled back, with
    the same noise (the DDIM sampler is checked against diffusers in its own file)."""
    x = random_tensor(0)
    ours = FlowEulerSampler(flow64(), eta=eta).advance(
        velocity_field, x, sigma, sigma_next, generator=seeded(3)
    )

    def ddpm_scale(level: float) -> tuple[float, float]:  # (ᾱ, r)
        r = math.hypot(1 - level, level)
        return ((1 - level) / r) ** 2, r

    (alpha_bar, r), (alpha_bar_next, r_next) = ddpm_scale(sigma), ddpm_scale(sigma_next)
    velocity = velocity_field(x, sigma)
    step = StepInputs(
        sample=x / r,
        pred_x0=x - sigma * velocity,
        pred_epsilon=x + (1 - sigma) * velocity,
        t=1,
        t_prev=0,
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_next,
        last_step=None,
        generator=seeded(3),
    )
    expected = r_next * DDIMSampler(make_schedule(ScheduleConfig()), eta=eta).next_sample(step)

    torch.testing.assert_close(ours.sample, expected, atol=1e-10, rtol=0.0)
    torch.testing.assert_close(ours.pred_x0, step.pred_x0)


def test_stochastic_euler_draws_its_noise_from_the_generator_and_ends_on_its_x0() -> None:
    schedule = flow64()
    levels = our_grid(schedule, 5)
    x = random_tensor(0)

    def predict(x_in: torch.Tensor, sigma: float) -> torch.Tensor:
        # Not pulled to one x0 (as velocity_field is), so every step's noise shows at the end.
        return 0.3 * x_in + 0.1 * torch.sin(x_in + sigma)

    def chain(eta: float, seed: int) -> torch.Tensor:
        sampler, sample_ = FlowEulerSampler(schedule, eta=eta), x
        generator = seeded(seed)
        for sigma, sigma_next in itertools.pairwise(levels):
            step = sampler.advance(predict, sample_, sigma, sigma_next, generator=generator)
            sample_ = step.sample
        torch.testing.assert_close(sample_, step.pred_x0)  # the last step lands on x̂0
        return sample_

    torch.testing.assert_close(chain(1.0, seed=5), chain(1.0, seed=5))
    assert (chain(1.0, seed=5) - chain(1.0, seed=6)).abs().max() > 1e-3
    assert (chain(1.0, seed=5) - chain(0.0, seed=5)).abs().max() > 1e-3
    # eta = 0 ignores the generator: the deterministic Euler chain.
    torch.testing.assert_close(chain(0.0, seed=5), chain(0.0, seed=6), atol=0.0, rtol=0.0)


# ---- the sampling loop -------------------------------------------------------------------------


class ExactGaussianVelocity:
    """The exact velocity for 1-D data x0 ~ N(mean, std²); std = 0 is a single known point.

    x_σ = (1-σ)·x0 + σ·ε is Gaussian, so E[ε - x0 | x_σ] is linear in x_σ, and the flow keeps
    (x_σ - (1-σ)·mean)/√((1-σ)²·std² + σ²) constant: the endpoint of noise ε is mean + std·ε.
    """

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x, timesteps, cond):
        sigma = (timesteps.double() / T).reshape(-1, 1, 1, 1)
        centred = x - (1 - sigma) * self.mean
        variance = (1 - sigma) ** 2 * self.std**2 + sigma**2
        x0 = self.mean + (1 - sigma) * self.std**2 * centred / variance
        noise = sigma * centred / variance
        return noise - x0


def ode_error(sampler: str, steps: int) -> float:
    model = ExactGaussianVelocity(mean=0.7, std=0.5)
    shape = (512, 1, 1, 1)
    start = torch.randn(shape, generator=seeded(), dtype=torch.float64)

    x0 = sample(model, flow64(), sampler, steps=steps, cond=None, shape=shape, generator=seeded())

    return (x0 - (model.mean + model.std * start)).abs().max().item()


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 7])
def test_exact_velocity_of_a_single_point_recovers_that_point(steps, sampler) -> None:
    model = ExactGaussianVelocity(mean=1.25, std=0.0)

    x0 = sample(model, flow64(), sampler, steps=steps, cond=None, shape=(64, 1, 1, 1))

    torch.testing.assert_close(x0, torch.full_like(x0, 1.25), rtol=0, atol=1e-9)


def test_euler_error_falls_with_steps_and_heun_beats_it_at_equal_model_calls() -> None:
    errors = [ode_error("euler", steps) for steps in (5, 10, 20, 40)]

    assert errors == sorted(errors, reverse=True)
    assert ode_error("heun", 10) < 0.5 * ode_error("euler", 19)  # both 19 model calls


class RecordingModel:
    """Returns a fixed fraction of its input and records the input and timesteps of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, timesteps, cond):
        self.calls.append((x.clone(), timesteps.clone()))
        return 0.1 * x


def test_img2img_enters_the_grid_at_the_sigma_of_its_strength() -> None:
    schedule, model = flow64(flow_shift=3.0), RecordingModel()
    init = torch.full((2, 4, 3, 3), 0.8, dtype=torch.float64)

    sample(
        model,
        schedule,
        "euler",
        steps=10,
        cond=None,
        init_latent=init,
        strength=0.4,
        generator=seeded(4),
    )

    sigma = schedule.sampling_levels(10)[6]  # the last 4 of 10 steps
    noise = torch.randn(init.shape, generator=seeded(4), dtype=torch.float64)
    assert len(model.calls) == 4
    first_input, first_timesteps = model.calls[0]
    torch.testing.assert_close(first_input, (1 - sigma) * init + sigma * noise)
    torch.testing.assert_close(first_timesteps, torch.full((2,), sigma * T, dtype=torch.float32))


def test_guidance_runs_both_branches_in_one_call_with_float_timesteps() -> None:
    model = RecordingModel()
    cond, uncond = torch.ones(3, 2, 5), torch.zeros(3, 2, 5)

    sample(
        model,
        flow64(),
        "heun",
        steps=3,
        cond=cond,
        uncond=uncond,
        cfg_scale=4.0,
        shape=(3, 4, 2, 2),
    )

    assert len(model.calls) == 5  # Heun: 2·3 - 1 model calls, each of batch 2·3
    assert all(t.shape == (6,) and t.is_floating_point() for _, t in model.calls)
    assert [t[0].item() for _, t in model.calls] == pytest.approx(
        [1.0 * T, 0.5025 * T, 0.5025 * T, 0.005 * T, 0.005 * T]
    )


def test_the_unet_embeds_fractional_timesteps_without_rounding_them() -> None:
    torch.manual_seed(0)
    config = UNetConfig(
        model_channels=8,
        channel_multipliers=(1,),
        res_blocks_per_level=1,
        transformer_levels=(0,),
        norm_groups=4,
        attention_head_dim=8,
        context_dim=16,
    )
    unet = UNet(config).eval()
    with torch.no_grad():  # a fresh U-Net predicts zero: give its output layer weights
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)

    with torch.no_grad():
        outputs = [unet(x, torch.tensor([t]), context) for t in (10.0, 10.5, 10.0)]

    assert torch.equal(outputs[0], outputs[2])
    assert not torch.allclose(outputs[0], outputs[1])


# ---- training: σ, target, noise options --------------------------------------------------------


def test_training_sigmas_follow_the_shifted_logit_normal_law() -> None:
    """P(σ ≤ s) = Φ((logit(unshift(s)) - m)/std), unshift(s) = s/(k - (k-1)·s)."""
    mean, std, shift = 0.5, 0.8, 3.0
    schedule = FlowMatchingSchedule(
        flow_config(flow_logit_mean=mean, flow_logit_std=std, flow_shift=shift)
    )
    sigmas = schedule.training_sigmas(torch.randn(200_000, generator=seeded(), dtype=torch.float64))

    for s in (0.1, 0.3, 0.5, 0.7, 0.9, 0.97):
        unshifted = s / (shift - (shift - 1) * s)
        logit = math.log(unshifted / (1 - unshifted))
        expected = 0.5 * (1 + math.erf((logit - mean) / (std * math.sqrt(2))))
        assert (sigmas <= s).double().mean().item() == pytest.approx(expected, abs=4e-3), s
    assert sigmas.min() > 0 and sigmas.max() < 1


def test_the_loss_is_the_squared_error_of_the_velocity_at_the_noisy_input() -> None:
    schedule = FlowMatchingSchedule(flow_config())
    x0, noise = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    sigma = torch.tensor([0.1, 0.4, 0.7, 1.0])
    seen = {}

    def model(x_sigma, timesteps, cond):
        seen["input"], seen["timesteps"] = x_sigma, timesteps
        return torch.zeros_like(x_sigma)

    losses = per_sample_loss(model, schedule, x0, None, sigma, noise)
    exact = per_sample_loss(lambda *_: noise - x0, schedule, x0, None, sigma, noise)

    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["input"], (1 - s) * x0 + s * noise)
    torch.testing.assert_close(seen["timesteps"], sigma * T)
    torch.testing.assert_close(losses, ((noise - x0) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(exact, torch.zeros(4))


def test_offset_noise_moves_input_and_target_by_one_value_per_image_and_channel() -> None:
    noise, offsets = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 1, 1)

    target, noisy = training_noise(flow_config(noise_offset=0.1), noise, offset_normals=offsets)

    assert target is noisy
    torch.testing.assert_close(target - noise, (0.1 * offsets).expand_as(noise))


def test_input_perturbation_changes_the_input_noise_and_leaves_the_target_alone() -> None:
    noise, perturbation = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    config = flow_config(input_perturbation=0.1)

    target, noisy = training_noise(config, noise, perturbation_normals=perturbation)

    assert torch.equal(target, noise)
    torch.testing.assert_close(noisy, noise + 0.1 * perturbation)


def test_both_options_off_leave_the_noise_untouched() -> None:
    noise = torch.randn(2, 4, 3, 3)
    assert training_noise(ScheduleConfig(), noise) == (noise, noise)


def test_an_option_without_its_draws_is_refused() -> None:
    with pytest.raises(ValueError, match=r"noise_offset=0\.1 needs offset_normals"):
        training_noise(flow_config(noise_offset=0.1), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("objective", ["ddpm", "flow_matching"])
def test_the_training_step_feeds_perturbed_offset_noise_in_and_scores_against_offset_noise(
    objective,
) -> None:
    diffusion = {"objective": objective, "noise_offset": 0.2, "input_perturbation": 0.3}
    module = tiny_diffusion_module(diffusion=diffusion, cond_dropout=0.0)
    batch_size = 3
    drawn = module.step_randomness(train=True).draw(batch_size, seeded(7))
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x_t, t, cond):
            seen["input"] = x_t
            return torch.zeros_like(x_t)

    module.unet = Spy()
    mean, std = (
        torch.randn(batch_size, *TINY_LATENT_SHAPE),
        torch.rand(batch_size, *TINY_LATENT_SHAPE),
    )
    levels = module._training_levels(drawn)
    losses = module._losses(
        mean.half(),
        std.half(),
        drawn["posterior_noise"],
        torch.randn(batch_size, *TINY_CONTEXT),
        drawn["drop_condition"],
        levels,
        drawn["diffusion_noise"],
        drawn["offset_noise"],
        drawn["perturbation_noise"],
    )

    z = module.latent_normalizer.normalize(
        mean.half().float() + std.half().float() * drawn["posterior_noise"]
    )
    offset_noise = drawn["diffusion_noise"] + 0.2 * drawn["offset_noise"]
    perturbed = offset_noise + 0.3 * drawn["perturbation_noise"]
    schedule = module.schedule
    torch.testing.assert_close(seen["input"], schedule.q_sample(z, levels, perturbed))
    target = (
        offset_noise - z
        if objective == "flow_matching"
        else schedule.velocity(z, levels, offset_noise)  # the default v-prediction
    )
    torch.testing.assert_close(losses, (target**2).mean(dim=(1, 2, 3)))


def test_flow_training_draws_normals_for_sigma_and_the_options_draw_last() -> None:
    """The options' draws come after every other, so switching them on (or reading a run
    without them) leaves the earlier numbers alone; a key always gives the same numbers."""
    plain = tiny_diffusion_module(diffusion={"objective": "flow_matching"})
    noisy = tiny_diffusion_module(
        diffusion={"objective": "flow_matching", "noise_offset": 0.1, "input_perturbation": 0.1}
    )
    without = plain.step_randomness(train=True).draw(4, seeded(3))
    first = noisy.step_randomness(train=True).draw(4, seeded(3))
    again = noisy.step_randomness(train=True).draw(4, seeded(3))
    other = noisy.step_randomness(train=True).draw(4, seeded(4))

    assert "timesteps" not in without and without["timestep_normals"].shape == (4,)
    assert "offset_noise" not in without and "perturbation_noise" not in without
    for name, tensor in without.items():
        assert torch.equal(first[name], tensor), name
    assert first["offset_noise"].shape == (4, TINY_LATENT_SHAPE[0], 1, 1)
    assert first["perturbation_noise"].shape == (4, *TINY_LATENT_SHAPE)
    for name in ("offset_noise", "perturbation_noise"):
        assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])
    torch.testing.assert_close(
        plain._training_levels(without),
        torch.sigmoid(without["timestep_normals"]),  # m = 0, s = 1, no shift: the defaults
    )


def test_the_default_ddpm_draws_are_unchanged_by_the_new_options() -> None:
    randomness = tiny_diffusion_module().step_randomness(train=True)
    assert randomness == StepRandomness(
        posterior_noise_shape=TINY_LATENT_SHAPE,
        num_timesteps=200,
        diffusion_noise_shape=TINY_LATENT_SHAPE,
        cond_dropout=0.2,
    )


def test_flow_validation_spreads_sigma_over_zero_to_one_the_same_every_time() -> None:
    module = tiny_diffusion_module(diffusion={"objective": "flow_matching"}).eval()
    batch = {
        "latent_mean": torch.randn(4, *TINY_LATENT_SHAPE).half(),
        "text_hidden_states": torch.randn(4, *TINY_CONTEXT).half(),
        "diffusion_noise": torch.randn(4, *TINY_LATENT_SHAPE),
    }
    with torch.no_grad():
        first, sigmas = module.validation_losses(batch)
        torch.manual_seed(5)
        second, _ = module.validation_losses(batch)

    assert sigmas.tolist() == [0.125, 0.375, 0.625, 0.875]
    assert torch.equal(first, second)
    assert module._bucket_names("val") == ("val/loss_sigma0.00-0.50", "val/loss_sigma0.50-1.00")


def test_sigma_buckets_are_equal_slices_of_zero_to_one_with_one_in_the_last() -> None:
    sigmas = torch.tensor([0.0, 0.249, 0.25, 0.99, 1.0])

    assert timestep_buckets(sigmas, 1.0, 4).tolist() == [0, 0, 1, 3, 3]
    assert timestep_buckets(torch.tensor([0, 49, 50, 199]), 200, 4).tolist() == [0, 0, 1, 3]
    assert [bucket_name(b, 1.0, 4) for b in (0, 3)] == ["sigma0.00-0.25", "sigma0.75-1.00"]
    assert bucket_name(1, 200, 4) == "t050-099"


# ---- what is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("objective", "sampler", "valid"),
    [("flow_matching", "ddim", "euler | heun"), ("ddpm", "euler", "ddpm | ddim | dpmpp_2m")],
)
def test_a_sampler_of_the_other_objective_is_refused_naming_the_valid_ones(
    objective, sampler, valid
) -> None:
    diffusion = ScheduleConfig(objective=objective)
    with pytest.raises(ValueError, match=rf"sampler='{sampler}' does not fit .*{objective}"):
        SamplingOptions.checked(diffusion=diffusion, sampler=sampler)
    with pytest.raises(ValueError) as refusal:
        SamplingOptions.checked(diffusion=diffusion, sampler=sampler)
    assert str(refusal.value).endswith(f"its samplers are {valid}.")


def test_flow_sampling_takes_more_steps_than_the_timestep_scale() -> None:
    options = SamplingOptions.checked(diffusion=flow_config(), sampler="heun", steps=T + 50)
    assert options.steps == T + 50


def test_training_refuses_a_flow_model_with_ddpm_validation_sampling() -> None:
    with pytest.raises(ValueError, match=r"validation\.sampling: sampler='ddim' does not fit"):
        tiny_diffusion_module(
            diffusion={"objective": "flow_matching"},
            validation={"timestep_buckets": 2, "sampling": {"sampler": "ddim"}},
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loss_weighting": "min_snr"}, "loss_weighting='min_snr' weighs .* Set diffusion"),
        ({"flow_shift": 0.0}, "flow_shift must be a positive number, got 0.0"),
        ({"flow_logit_std": -1.0}, "flow_logit_std must be a positive number"),
        ({"noise_offset": -0.1}, r"noise_offset must be a number ≥ 0, got -0\.1"),
        ({"input_perturbation": "0.1"}, "input_perturbation must be a number ≥ 0, got '0.1'"),
        ({"objective": "edm"}, "objective='edm' is not supported; choose one of ddpm, flow_"),
    ],
)
def test_bad_flow_settings_are_refused_naming_the_value(changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        flow_config(**changes)


def test_the_ddpm_keys_are_ignored_by_flow_matching_rather_than_refused() -> None:
    """The group's defaults (v-prediction, zero terminal SNR) must not stop a flow run; an
    ε-prediction on a zero-terminal-SNR chain, refused for ddpm, means nothing here."""
    config = flow_config(prediction_type="epsilon", rescale_zero_terminal_snr=True)
    assert isinstance(make_schedule(config), FlowMatchingSchedule)
    with pytest.raises(ValueError, match="make_schedule"):
        NoiseSchedule(config)


# ---- through the real stage --------------------------------------------------------------------


def test_a_flow_model_with_both_noise_options_trains_on_cpu_and_samples(
    synthetic_root, tmp_path
) -> None:
    """The real stage: the loader draws σ's normals and the options' noise, training and
    validation log σ buckets, the grids sample with Heun and sample.py, told no sampler, with
    the flow model's own (Euler) from the export."""
    cfg = compose_config(
        "train_unet",
        [
            *TINY_UNET_RUN,
            *synthetic_run_overrides(synthetic_root, tmp_path),
            f"vae_export={save_tiny_vae_export(tmp_path / 'vae')}",
            "diffusion.objective=flow_matching",
            "diffusion.flow_shift=2.0",
            "diffusion.noise_offset=0.1",
            "diffusion.input_perturbation=0.1",
            "data.batch_size=4",
            "cache.text_max_positions=8",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            "logger=csv",
            "validation.prompts=[a red circle]",
            "validation.timestep_buckets=2",
            "validation.sample_every_n_epochs=1",
            "validation.sampling.sampler=heun",
            "validation.sampling.eta=0.0",  # the demo samples with stochastic Euler
            "validation.sampling.steps=2",
            "evaluation.every_n_steps=null",
        ],
    )
    result = run_unet_stage(cfg, run_dir=tmp_path / "runs" / "unet")

    recorded = read_unet_metadata(result.export_dir)["diffusion"]
    assert recorded["objective"] == "flow_matching" and recorded["noise_offset"] == 0.1
    rows = list(csv.DictReader((result.run_dir / "csv" / "metrics.csv").open()))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert any(row.get("train/loss_sigma0.00-0.50") for row in rows)
    assert any(row.get("val/loss_sigma0.50-1.00") for row in rows)
    assert list((result.run_dir / "images").glob("samples_raw_samples_ema_step*.png"))

    overrides = [
        f"ckpt={result.export_dir}",
        f"out_dir={tmp_path / 'samples'}",
        "trainer=cpu",
        "prompt='a red circle'",
        "n=1",
        "steps=3",
        "progress=false",
    ]
    sampled = run_sampling(compose_config("sample", overrides))
    assert len(sampled.image_paths) == 1 and sampled.image_paths[0].stat().st_size > 0
    # No sampler named: the checkpoint's objective picks its own.
    assert read_png_metadata(sampled.image_paths[0])["sampler"] == "euler"


def test_eta_is_taken_by_euler_and_refused_for_heun_naming_the_samplers_that_take_it() -> None:
    flow = ScheduleConfig(objective="flow_matching")
    assert SamplingOptions.checked(diffusion=flow, sampler="euler", eta=1.0).eta == 1.0
    with pytest.raises(ValueError, match=r"eta=0\.5 only applies to sampler ddim .* or euler"):
        SamplingOptions.checked(diffusion=flow, sampler="heun", eta=0.5)
