"""The sampling loop: exact denoisers on toy 1-D data, guidance cost, img2img, seeds and errors."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import (
    SAMPLERS_BY_OBJECTIVE,
    DPMSolverPP2MSampler,
    FlowMatchingSchedule,
    GuidanceInterval,
    NoiseSchedule,
    ScheduleConfig,
    sample,
    sampling_timesteps,
)

SCHEDULE_CONFIGS = {
    "epsilon": ScheduleConfig(prediction_type="epsilon", rescale_zero_terminal_snr=False),
    "v_prediction": ScheduleConfig(prediction_type="v_prediction", rescale_zero_terminal_snr=False),
    "zero_terminal_snr": ScheduleConfig(
        prediction_type="v_prediction", rescale_zero_terminal_snr=True
    ),
}
DDPM_SAMPLERS = SAMPLERS_BY_OBJECTIVE["ddpm"]  # flow matching's: tests/test_flow_matching.py


def schedule64(config: ScheduleConfig | None = None) -> NoiseSchedule:
    return NoiseSchedule(config, dtype=torch.float64)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ExactGaussianDenoiser:
    """The exact ε (or v) for 1-D data x0 ~ N(mean, std²); std = 0 is a single known point.

    For Gaussian data E[x0 | x_t] is linear in x_t, and the sampling ODE keeps
    (x_t - √ᾱ·mean)/√(ᾱ·std² + 1 - ᾱ) constant, so its exact endpoint is known too.
    """

    def __init__(self, schedule: NoiseSchedule, mean: float, std: float):
        self.schedule, self.mean, self.std = schedule, mean, std

    def __call__(self, x_t, t, cond):
        alpha_bar = self.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        signal, noise_level = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        variance = alpha_bar * self.std**2 + 1 - alpha_bar
        x0 = self.mean + signal * self.std**2 * (x_t - signal * self.mean) / variance
        epsilon = (x_t - signal * x0) / noise_level
        if self.schedule.prediction_type == "v_prediction":
            return signal * epsilon - noise_level * x0
        return epsilon

    def ode_endpoint(self, x_start: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.schedule.alphas_cumprod[-1]
        spread = (alpha_bar * self.std**2 + 1 - alpha_bar).sqrt()
        return self.mean + self.std * (x_start - alpha_bar.sqrt() * self.mean) / spread


def ode_error(sampler: str, steps: int) -> float:
    """Largest distance from the exact sampling-ODE endpoint for 512 starting noises."""
    schedule = schedule64()
    model = ExactGaussianDenoiser(schedule, mean=0.7, std=0.5)
    shape = (512, 1, 1, 1)
    x_start = torch.randn(shape, generator=seeded(), dtype=torch.float64)

    x0 = sample(model, schedule, sampler, steps=steps, cond=None, shape=shape, generator=seeded())

    return (x0 - model.ode_endpoint(x_start)).abs().max().item()


@pytest.mark.parametrize("config", SCHEDULE_CONFIGS.values(), ids=SCHEDULE_CONFIGS.keys())
@pytest.mark.parametrize("sampler", DDPM_SAMPLERS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_exact_denoiser_of_a_single_point_recovers_that_point(steps, sampler, config):
    schedule = schedule64(config)
    model = ExactGaussianDenoiser(schedule, mean=1.25, std=0.0)

    x0 = sample(model, schedule, sampler, steps=steps, cond=None, shape=(64, 1, 1, 1))

    torch.testing.assert_close(x0, torch.full_like(x0, 1.25), rtol=0, atol=1e-9)


def test_ddim_error_falls_as_steps_increase():
    errors = [ode_error("ddim", steps) for steps in (5, 10, 20, 50, 200)]

    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.03


def test_dpm_solver_is_more_accurate_than_ddim_at_the_same_step_count():
    assert ode_error("dpmpp_2m", 20) < 0.5 * ode_error("ddim", 20)


class RecordingModel:
    """Returns a fixed fraction of its input and records the batch of every call."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone()))
        return 0.1 * x_t


def test_without_guidance_each_step_is_one_model_call_on_batch_b():
    model = RecordingModel()
    cond, uncond = torch.ones(3, 5, 8), torch.zeros(3, 5, 8)

    sample(model, NoiseSchedule(), "ddim", steps=10, cond=cond, uncond=uncond, shape=(3, 4, 2, 2))

    assert [x.shape[0] for x, _ in model.calls] == [3] * 10


def test_with_guidance_each_step_is_one_model_call_on_batch_2b():
    model = RecordingModel()
    cond, uncond = torch.ones(3, 5, 8), torch.zeros(3, 5, 8)

    sample(
        model,
        NoiseSchedule(),
        "ddim",
        steps=10,
        cond=cond,
        uncond=uncond,
        cfg_scale=5.0,
        shape=(3, 4, 2, 2),
    )

    assert [x.shape[0] for x, _ in model.calls] == [6] * 10


@pytest.mark.parametrize(
    "schedule",
    [NoiseSchedule(), FlowMatchingSchedule(ScheduleConfig(objective="flow_matching"))],
    ids=["ddpm", "flow_matching"],
)
def test_outside_the_guidance_interval_a_step_is_one_unguided_call(schedule):
    model = RecordingModel()
    cond, uncond = torch.ones(3, 5, 8), torch.zeros(3, 5, 8)
    interval = GuidanceInterval(low=0.5, high=3.0)
    sampler = "euler" if isinstance(schedule, FlowMatchingSchedule) else "ddim"

    sample(
        model,
        schedule,
        sampler,
        steps=20,
        cond=cond,
        uncond=uncond,
        cfg_scale=5.0,
        guidance_interval=interval,
        shape=(3, 4, 2, 2),
    )

    levels = schedule.sampling_levels(20)
    inside = [interval.applies(schedule.noise_to_signal(level)) for level in levels]
    assert 0 < sum(inside) < len(levels)  # the interval cuts the chain at both ends
    assert [x.shape[0] for x, _ in model.calls] == [6 if guided else 3 for guided in inside]


def test_an_interval_that_holds_every_level_changes_nothing_and_an_empty_one_is_scale_one():
    class ConditionalModel:
        def __call__(self, x_t, t, cond):
            return 0.1 * x_t + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    def draw(**options) -> torch.Tensor:
        return sample(
            ConditionalModel(),
            NoiseSchedule(),
            "ddim",
            steps=10,
            cond=torch.ones(2, 5, 8),
            uncond=torch.zeros(2, 5, 8),
            shape=(2, 4, 2, 2),
            generator=seeded(),
            **options,
        )

    everywhere = draw(cfg_scale=4.0, guidance_interval=GuidanceInterval())
    nowhere = draw(cfg_scale=4.0, guidance_interval=GuidanceInterval(high=1e-9))

    torch.testing.assert_close(everywhere, draw(cfg_scale=4.0))
    torch.testing.assert_close(nowhere, draw(cfg_scale=1.0))
    assert not torch.allclose(everywhere, nowhere)


def test_model_sees_each_sampling_timestep_once_in_order():
    model = RecordingModel()

    sample(model, NoiseSchedule(), "dpmpp_2m", steps=20, cond=None, shape=(2, 4, 2, 2))

    seen = [t.tolist() for _, t in model.calls]
    assert seen == [[t, t] for t in sampling_timesteps(200, 20).tolist()]


@pytest.mark.parametrize("sampler", DDPM_SAMPLERS)
def test_same_seed_gives_the_same_sample(sampler):
    def draw(seed: int) -> torch.Tensor:
        return sample(
            RecordingModel(),
            NoiseSchedule(),
            sampler,
            steps=10,
            cond=None,
            shape=(2, 4, 3, 3),
            generator=seeded(seed),
        )

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_img2img_starts_from_the_init_latent_noised_to_the_first_kept_step():
    schedule, model = schedule64(), RecordingModel()
    init = torch.full((2, 4, 3, 3), 0.8, dtype=torch.float64)

    sample(
        model,
        schedule,
        "ddim",
        steps=20,
        cond=None,
        init_latent=init,
        strength=0.5,
        generator=seeded(4),
    )

    first_t = sampling_timesteps(200, 20)[10].item()
    noise = torch.randn(init.shape, generator=seeded(4), dtype=torch.float64)
    assert len(model.calls) == 10
    assert model.calls[0][1].tolist() == [first_t, first_t]
    torch.testing.assert_close(model.calls[0][0], schedule.q_sample(init, first_t, noise))


def test_sampling_runs_in_the_schedules_dtype():
    x = sample(RecordingModel(), schedule64(), "ddpm", steps=3, cond=None, shape=(1, 1, 2, 2))

    assert x.dtype == torch.float64


@pytest.mark.parametrize(("progress", "shown"), [(False, False), (True, True)])
def test_progress_bar_is_shown_only_when_asked(progress, shown, capsys):
    sample(
        RecordingModel(),
        NoiseSchedule(),
        "ddim",
        steps=4,
        cond=None,
        shape=(1, 1, 2, 2),
        progress=progress,
    )

    assert ("4/4" in capsys.readouterr().err) is shown


def call_sample(**overrides):
    arguments = {"steps": 10, "cond": None, "shape": (1, 1, 2, 2)} | overrides
    sampler = arguments.pop("sampler", "ddim")
    return sample(RecordingModel(), NoiseSchedule(), sampler, **arguments)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shape": None}, "give exactly one of shape .* or init_latent"),
        ({"init_latent": torch.zeros(1, 1, 2, 2)}, "give exactly one of shape .* or init_latent"),
        ({"cfg_scale": 3.0}, "cfg_scale=3.0 needs the unconditional embedding"),
    ],
    ids=["neither_shape_nor_latent", "both_shape_and_latent", "guidance_without_uncond"],
)
def test_bad_arguments_are_refused_with_what_was_wrong(overrides, message):
    """Calls the loop cannot run. Sampling options (steps, strength, eta, sampler) are checked
    where they enter, by SamplingOptions.checked (tests/test_sample.py), not in the loop."""
    with pytest.raises(ValueError, match=message):
        call_sample(**overrides)


def test_dpm_solver_refuses_a_last_step_that_is_not_the_one_before():
    schedule, x = NoiseSchedule(), torch.zeros(1, 1, 2, 2)
    solver = DPMSolverPP2MSampler(schedule)
    later = solver.step(x, 50, 40, x)

    with pytest.raises(ValueError, match="last_step left t=50, which does not precede t=100"):
        solver.step(x, 100, 90, x, last_step=later)


def test_per_image_generators_make_each_image_independent_of_its_batch() -> None:
    """Seed i gives the same sample alone or inside a batch: one generator per image."""
    schedule = NoiseSchedule(
        ScheduleConfig(prediction_type="epsilon", rescale_zero_terminal_snr=False)
    )

    def zero_model(x, t, cond):
        return torch.zeros_like(x)

    def run(seeds: list[int]) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        shape = (len(seeds), 2, 4, 4)
        return sample(
            zero_model, schedule, "ddpm", steps=10, cond=None, shape=shape, generator=generators
        )

    batch = run([5, 6, 7])
    assert torch.equal(run([6])[0], batch[1])
    assert not torch.equal(batch[0], batch[1])


def test_a_wrong_number_of_generators_is_refused() -> None:
    schedule = NoiseSchedule(
        ScheduleConfig(prediction_type="epsilon", rescale_zero_terminal_snr=False)
    )
    with pytest.raises(ValueError, match="one per image"):
        sample(
            lambda x, t, c: x,
            schedule,
            "ddim",
            steps=2,
            cond=None,
            shape=(3, 1, 2, 2),
            generator=[torch.Generator()],
        )
