"""NoiseSchedule: β, ᾱ and SNR against closed forms; the forward process and its conversions."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diffusion import NoiseSchedule, ScheduleConfig


def schedule64(**overrides) -> NoiseSchedule:
    """The textbook ε-prediction schedule unless ``overrides`` say otherwise."""
    plain = {"prediction_type": "epsilon", "rescale_zero_terminal_snr": False, **overrides}
    return NoiseSchedule(ScheduleConfig(**plain), dtype=torch.float64)


def test_default_is_200_linear_steps_from_5e4_to_0_1():
    schedule = schedule64()

    expected = torch.linspace(5e-4, 0.1, 200, dtype=torch.float64)
    torch.testing.assert_close(schedule.betas, expected, rtol=0, atol=1e-15)


def test_default_schedule_destroys_the_signal_by_the_last_step():
    assert schedule64().alphas_cumprod[-1] < 1e-3


def test_seed_endpoints_reproduce_the_seed_schedule_exactly():
    schedule = schedule64(beta_start=1e-4, beta_end=0.02)

    assert torch.equal(schedule.betas, torch.linspace(1e-4, 0.02, 200, dtype=torch.float64))
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.1322, abs=1e-4)


def alpha_bar_and_snr_by_hand(beta_start: float, beta_end: float, steps: int):
    """The oracle: linear β, ᾱ_t = ∏_{s≤t} (1 - β_s) and SNR_t = ᾱ_t / (1 - ᾱ_t) in plain
    Python floats, sharing no code with the schedule (as diffusers' ``compute_snr`` does)."""
    alpha_bar, product = [], 1.0
    for t in range(steps):
        product *= 1 - (beta_start + (beta_end - beta_start) * t / (steps - 1))
        alpha_bar.append(product)
    snr = [a / (1 - a) for a in alpha_bar]
    return torch.tensor(alpha_bar, dtype=torch.float64), torch.tensor(snr, dtype=torch.float64)


@pytest.mark.parametrize(("beta_start", "beta_end"), [(5e-4, 0.1), (1e-4, 0.02)])
def test_alpha_bar_is_the_running_product_of_one_minus_beta(beta_start, beta_end):
    schedule = schedule64(beta_start=beta_start, beta_end=beta_end)

    alpha_bar, _ = alpha_bar_and_snr_by_hand(beta_start, beta_end, 200)

    torch.testing.assert_close(schedule.alphas_cumprod, alpha_bar, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("beta_start", "beta_end"), [(5e-4, 0.1), (1e-4, 0.02)])
def test_snr_is_signal_over_noise_variance(beta_start, beta_end):
    schedule = schedule64(beta_start=beta_start, beta_end=beta_end)

    _, snr = alpha_bar_and_snr_by_hand(beta_start, beta_end, 200)

    torch.testing.assert_close(schedule.snr, snr, rtol=1e-10, atol=0)


def test_scaled_linear_is_linear_in_the_square_root_of_beta():
    schedule = schedule64(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    roots = schedule.betas.sqrt()
    torch.testing.assert_close(roots, torch.linspace(0.00085**0.5, 0.012**0.5, 200).double())


def test_scaled_linear_default_endpoints_scale_with_1000_over_t():
    schedule = schedule64(beta_schedule="scaled_linear", num_train_timesteps=500)

    assert schedule.betas[0].item() == pytest.approx(0.00085 * 2)
    assert schedule.betas[-1].item() == pytest.approx(0.012 * 2)


def test_cosine_alpha_bar_follows_the_squared_cosine_curve():
    steps = 200
    schedule = schedule64(beta_schedule="cosine", num_train_timesteps=steps)

    def curve(t: float) -> float:
        return math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = torch.tensor(
        [curve(t + 1) / curve(0) for t in range(steps - 1)], dtype=torch.float64
    )
    # The last β is capped at 0.999, so the curve holds up to T - 2.
    torch.testing.assert_close(schedule.alphas_cumprod[:-1], expected, rtol=1e-12, atol=0)
    assert schedule.betas[-1].item() == pytest.approx(0.999)


@pytest.mark.parametrize(
    ("config", "diffusers_options"),
    [
        ({}, {"beta_schedule": "linear", "beta_start": 5e-4, "beta_end": 0.1}),
        (
            {"beta_schedule": "scaled_linear"},
            {"beta_schedule": "scaled_linear", "beta_start": 0.00425, "beta_end": 0.06},
        ),
        ({"beta_schedule": "cosine"}, {"beta_schedule": "squaredcos_cap_v2"}),
        (
            {"rescale_zero_terminal_snr": True, "prediction_type": "v_prediction"},
            {"beta_start": 5e-4, "beta_end": 0.1, "rescale_betas_zero_snr": True},
        ),
    ],
    ids=["linear", "scaled_linear", "cosine", "zero_terminal_snr"],
)
def test_betas_agree_with_diffusers_float32_betas(config, diffusers_options):
    oracle = DDPMScheduler(num_train_timesteps=200, **diffusers_options)

    torch.testing.assert_close(schedule64(**config).betas.float(), oracle.betas)


def test_zero_terminal_snr_rescaling_ends_at_zero_and_keeps_the_first_step():
    plain = schedule64(prediction_type="v_prediction")
    rescaled = schedule64(rescale_zero_terminal_snr=True, prediction_type="v_prediction")

    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert rescaled.snr[-1].item() == 0.0
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item())


def test_zero_terminal_snr_rescaling_is_affine_in_sqrt_alpha_bar():
    old = schedule64(prediction_type="v_prediction").sqrt_alphas_cumprod
    new = schedule64(rescale_zero_terminal_snr=True, prediction_type="v_prediction")

    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])
    torch.testing.assert_close(new.sqrt_alphas_cumprod, expected)


def test_q_sample_has_the_forward_process_mean_and_std():
    schedule, t = schedule64(), 120
    x0 = torch.full((200_000, 1, 1, 1), 1.5, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=x0.dtype)

    x_t = schedule.q_sample(x0, torch.full((x0.shape[0],), t), noise)

    alpha_bar = schedule.alphas_cumprod[t].item()
    assert x_t.mean().item() == pytest.approx(1.5 * alpha_bar**0.5, abs=0.01)
    assert x_t.std().item() == pytest.approx((1 - alpha_bar) ** 0.5, abs=0.01)


def test_q_sample_uses_each_samples_own_timestep():
    schedule = schedule64()
    x0, noise = torch.ones(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, 1, 2, 2).double()

    x_t = schedule.q_sample(x0, torch.tensor([0, 199]), noise)

    assert x_t[0, 0, 0, 0].item() == pytest.approx(schedule.alphas_cumprod[0].sqrt().item())
    assert x_t[1, 0, 0, 0].item() == pytest.approx(schedule.alphas_cumprod[199].sqrt().item())


def random_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (4, 3, 5, 5)
    return (
        torch.randn(shape, generator=generator, dtype=torch.float64),
        torch.randn(shape, generator=generator, dtype=torch.float64),
    )


def test_epsilon_and_x0_conversions_invert_each_other():
    schedule, t = schedule64(), torch.tensor([0, 50, 150, 199])
    x0, noise = random_pair(0)
    x_t = schedule.q_sample(x0, t, noise)

    torch.testing.assert_close(schedule.x0_from_epsilon(x_t, t, noise), x0)
    torch.testing.assert_close(schedule.epsilon_from_x0(x_t, t, x0), noise)


def test_velocity_converts_back_to_the_x0_and_epsilon_it_came_from():
    schedule, t = schedule64(prediction_type="v_prediction"), torch.tensor([0, 50, 150, 199])
    x0, noise = random_pair(1)
    x_t = schedule.q_sample(x0, t, noise)
    v = schedule.velocity(x0, t, noise)

    torch.testing.assert_close(schedule.x0_from_velocity(x_t, t, v), x0)
    torch.testing.assert_close(schedule.epsilon_from_velocity(x_t, t, v), noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_model_output_is_read_according_to_prediction_type(prediction_type):
    schedule, t = schedule64(prediction_type=prediction_type), 80
    x0, noise = random_pair(2)
    x_t = schedule.q_sample(x0, t, noise)
    perfect = noise if prediction_type == "epsilon" else schedule.velocity(x0, t, noise)

    pred_x0, pred_epsilon = schedule.x0_and_epsilon(perfect, x_t, t)

    torch.testing.assert_close(pred_x0, x0)
    torch.testing.assert_close(pred_epsilon, noise)


def test_to_float64_recomputes_rather_than_upcasting_float32():
    float32 = NoiseSchedule()

    float64 = float32.to(dtype=torch.float64)

    assert float64.dtype == torch.float64
    recomputed = NoiseSchedule(ScheduleConfig(), dtype=torch.float64)
    assert torch.equal(float64.alphas_cumprod, recomputed.alphas_cumprod)


def test_coefficients_take_the_dtype_of_the_data():
    schedule = NoiseSchedule()  # float32
    x0 = torch.ones(2, 1, 2, 2, dtype=torch.float64)

    assert schedule.q_sample(x0, torch.tensor([3, 4]), torch.zeros_like(x0)).dtype == torch.float64


def test_alpha_bar_is_one_at_the_clean_end_of_the_chain():
    schedule = schedule64()

    assert schedule.alpha_bar(-1) == 1.0
    assert schedule.alpha_bar(199) == schedule.alphas_cumprod[199].item()


def test_timestep_outside_the_schedule_is_rejected_with_its_range():
    with pytest.raises(ValueError, match=r"t=200 is outside \[0, 199\]"):
        schedule64().alpha_bar(200)
