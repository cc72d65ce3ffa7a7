"""diffusion_loss: targets by prediction type, weighting by config, and reproducible draws."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import NoiseSchedule, ScheduleConfig, diffusion_loss, loss_weights

SHAPE = (4, 3, 8, 8)


def schedule64(**overrides) -> NoiseSchedule:
    """The textbook ε-prediction schedule unless ``overrides`` say otherwise."""
    plain = {"prediction_type": "epsilon", "rescale_zero_terminal_snr": False, **overrides}
    return NoiseSchedule(ScheduleConfig(**plain), dtype=torch.float64)


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Oracle:
    """Knows the true x0 and noise, so it can return the exact target plus a chosen error."""

    def __init__(self, schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, error=0.0):
        self.schedule, self.x0, self.noise, self.error = schedule, x0, noise, error

    def __call__(self, x_t, t, cond):
        if self.schedule.prediction_type == "v_prediction":
            return self.schedule.velocity(self.x0, t, self.noise) + self.error
        return self.noise + self.error


def fixed_draws():
    """x0, noise and one timestep per sample, from nearly clean to pure noise."""
    x0, noise = latents(0), latents(1)
    t = torch.tensor([0, 30, 120, 199])
    return x0, noise, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_perfect_prediction_has_zero_loss(prediction_type):
    schedule = schedule64(prediction_type=prediction_type)
    x0, noise, t = fixed_draws()

    loss = diffusion_loss(Oracle(schedule, x0, noise), schedule, x0, None, t=t, noise=noise)

    torch.testing.assert_close(loss, torch.zeros(4), rtol=0, atol=1e-10)


def test_v_prediction_scores_the_output_against_the_velocity_not_the_noise():
    schedule = schedule64(prediction_type="v_prediction")
    x0, noise, t = fixed_draws()

    def predicts_noise(x_t, t, cond):
        return noise

    loss = diffusion_loss(predicts_noise, schedule, x0, None, t=t, noise=noise)

    expected = ((noise - schedule.velocity(x0, t, noise)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected.float())
    assert loss[-1] > 1.0


def test_mse_loss_is_the_mean_squared_error_per_sample():
    schedule = schedule64()
    x0, noise, t = fixed_draws()
    error = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64).reshape(4, 1, 1, 1)

    loss = diffusion_loss(Oracle(schedule, x0, noise, error), schedule, x0, None, t=t, noise=noise)

    torch.testing.assert_close(loss, torch.tensor([0.25, 1.0, 4.0, 9.0]))


def diffusers_min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """The weights diffusers' training scripts use, from its own ``compute_snr``."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(
        num_train_timesteps=schedule.num_train_timesteps,
        trained_betas=schedule.to(dtype=torch.float64).betas.numpy(),
        prediction_type=schedule.prediction_type,
    )
    snr = compute_snr(scheduler, t).double()
    if schedule.prediction_type == "v_prediction":
        snr = snr + 1  # "Velocity objective requires that we add one to SNR values"
    gamma = schedule.config.min_snr_gamma
    return (torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr).float()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(prediction_type):
    schedule = schedule64(prediction_type=prediction_type, loss_weighting="min_snr")
    x0, noise, t = fixed_draws()

    loss = diffusion_loss(Oracle(schedule, x0, noise, 1.0), schedule, x0, None, t=t, noise=noise)

    torch.testing.assert_close(loss, diffusers_min_snr_weights(schedule, t))


def test_min_snr_with_v_prediction_trains_the_zero_terminal_snr_step():
    """At ᾱ_T = 0 the weight must not vanish: sampling starts from exactly that timestep."""
    schedule = schedule64(
        prediction_type="v_prediction", loss_weighting="min_snr", rescale_zero_terminal_snr=True
    )
    t = torch.arange(schedule.num_train_timesteps)

    weights = loss_weights(schedule, t)

    assert schedule.alpha_bar(schedule.num_train_timesteps - 1) == 0
    assert weights[-1] == 1
    torch.testing.assert_close(weights, diffusers_min_snr_weights(schedule, t))


def test_min_snr_caps_only_the_nearly_clean_timesteps():
    schedule = schedule64(loss_weighting="min_snr", min_snr_gamma=5.0)
    t = torch.arange(200)

    weights = loss_weights(schedule, t)

    clean = schedule.snr > 5.0
    assert clean.any() and (~clean).any()
    assert (weights[clean] < 1).all()
    torch.testing.assert_close(weights[~clean], torch.ones(int((~clean).sum())))


def test_loss_is_one_number_per_sample():
    schedule = NoiseSchedule()

    loss = diffusion_loss(
        lambda x, t, c: torch.zeros_like(x), schedule, torch.ones(5, 4, 2, 2), None
    )

    assert loss.shape == (5,)


def test_timesteps_and_noise_are_drawn_from_the_given_generator_alone():
    """What lets validation fix its draws: the generator decides them, the global RNG does not."""
    schedule, x0 = NoiseSchedule(), torch.ones(8, 4, 2, 2)
    seen = []

    def record(x_t, t, cond):
        seen.append((x_t, t))
        return torch.zeros_like(x_t)

    for global_seed, seed in [(0, 3), (1, 3), (0, 4)]:
        torch.manual_seed(global_seed)
        diffusion_loss(record, schedule, x0, None, generator=torch.Generator().manual_seed(seed))

    (x_t, t), (same_x_t, same_t), (other_x_t, other_t) = seen
    assert torch.equal(same_t, t) and torch.equal(same_x_t, x_t)
    assert not torch.equal(other_t, t) and not torch.equal(other_x_t, x_t)


def test_given_timesteps_noise_and_cond_reach_the_model_unchanged():
    schedule = schedule64()
    x0, noise, t = fixed_draws()
    cond = {"hidden_states": torch.zeros(4, 7, 16)}
    seen = {}

    def record(x_t, t_seen, cond_seen):
        seen.update(x_t=x_t, t=t_seen, cond=cond_seen)
        return torch.zeros_like(x_t)

    diffusion_loss(record, schedule, x0, cond, t=t, noise=noise)

    assert seen["cond"] is cond
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], schedule.q_sample(x0, t, noise))


def test_timesteps_out_of_range_are_refused_with_the_range():
    schedule = schedule64()
    x0 = latents()

    with pytest.raises(ValueError, match=r"\[0, 199\].*from 0 to 200"):
        diffusion_loss(lambda x, t, c: x, schedule, x0, None, t=torch.tensor([0, 1, 2, 200]))


def test_model_output_of_the_wrong_shape_is_refused():
    schedule = schedule64()

    def wrong_shape(x_t, t, cond):
        return x_t[:, :1]

    with pytest.raises(ValueError, match=r"returned shape \(4, 1, 8, 8\)"):
        diffusion_loss(wrong_shape, schedule, latents(), None)
