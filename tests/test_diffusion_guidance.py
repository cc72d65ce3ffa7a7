"""Classifier-free guidance: one batched call, the guidance formula, no extra work at scale 1,
and the interval of noise levels it is applied over."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import (
    FlowMatchingSchedule,
    GuidanceInterval,
    NoiseSchedule,
    ScheduleConfig,
    guided_prediction,
)
from ldm.pipeline import SamplingOptions


class CountingModel:
    """A conditional 'denoiser' whose output depends on cond, recording every call's batch size."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def __call__(self, x_t, t, cond):
        self.batch_sizes.append(x_t.shape[0])
        return (
            0.5 * x_t + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + 0.01 * t.reshape(-1, 1, 1, 1)
        )


def inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(batch, 4, 2, 2, generator=generator)
    t = torch.tensor([10, 20, 30][:batch])
    cond = torch.randn(batch, 5, 8, generator=generator)
    uncond = torch.zeros(batch, 5, 8)
    return x_t, t, cond, uncond


def test_scale_one_is_one_conditional_call_on_batch_b():
    model = CountingModel()
    x_t, t, cond, uncond = inputs()

    out = guided_prediction(model, x_t, t, cond, uncond, cfg_scale=1.0)

    assert model.batch_sizes == [3]
    torch.testing.assert_close(out, CountingModel()(x_t, t, cond))


def test_guidance_is_one_call_on_the_doubled_batch():
    model = CountingModel()
    x_t, t, cond, uncond = inputs()

    guided_prediction(model, x_t, t, cond, uncond, cfg_scale=7.5)

    assert model.batch_sizes == [6]


def test_guidance_extrapolates_from_unconditional_towards_conditional():
    x_t, t, cond, uncond = inputs()
    conditional = CountingModel()(x_t, t, cond)
    unconditional = CountingModel()(x_t, t, uncond)

    out = guided_prediction(CountingModel(), x_t, t, cond, uncond, cfg_scale=4.0)

    torch.testing.assert_close(out, unconditional + 4.0 * (conditional - unconditional))


def test_guidance_without_uncond_is_refused():
    x_t, t, cond, _ = inputs()

    with pytest.raises(ValueError, match=r"cfg_scale=3\.0 needs the unconditional embedding"):
        guided_prediction(CountingModel(), x_t, t, cond, None, cfg_scale=3.0)


def test_uncond_of_another_shape_is_refused_with_both_shapes():
    x_t, t, cond, _ = inputs()

    with pytest.raises(ValueError, match=r"cond \(3, 5, 8\) and uncond \(1, 5, 8\)"):
        guided_prediction(CountingModel(), x_t, t, cond, torch.zeros(1, 5, 8), cfg_scale=3.0)


# The guidance interval (Kynkäänniemi et al. 2024): where along the chain guidance applies.

FLOW = ScheduleConfig(objective="flow_matching")
SCHEDULES = {
    "ddpm": NoiseSchedule(ScheduleConfig(rescale_zero_terminal_snr=False), dtype=torch.float64),
    "zero_terminal_snr": NoiseSchedule(ScheduleConfig(), dtype=torch.float64),
    "flow_matching": FlowMatchingSchedule(FLOW, dtype=torch.float64),
}


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_noise_to_signal_is_the_noise_per_unit_of_signal_in_x_t(schedule):
    """Both objectives' x_t are a scaled x0 + ratio·ε, so one interval means the same noise."""
    for level in schedule.sampling_levels(9)[1:]:  # the first is pure noise in two of them
        signal = schedule.q_sample(torch.ones(1), level, torch.zeros(1)).item()
        noise = schedule.q_sample(torch.zeros(1), level, torch.ones(1)).item()
        assert schedule.noise_to_signal(level) == pytest.approx(noise / signal, rel=1e-6)
    assert schedule.noise_to_signal(schedule.clean_level) == 0


@pytest.mark.parametrize("name", ["zero_terminal_snr", "flow_matching"])
def test_pure_noise_has_an_infinite_ratio_inside_an_open_interval(name):
    schedule = SCHEDULES[name]
    pure_noise = schedule.sampling_levels(5)[0]

    assert schedule.noise_to_signal(pure_noise) == math.inf
    assert GuidanceInterval(low=0.5).applies(math.inf)
    assert not GuidanceInterval(low=0.5, high=10).applies(math.inf)


def test_the_interval_is_open_below_and_closed_above():
    interval = GuidanceInterval(low=0.28, high=5.42)

    assert [interval.applies(r) for r in (0.28, 0.2801, 5.42, 5.4201)] == [0, 1, 1, 0]
    assert str(interval) == "(0.28, 5.42]"
    assert interval.as_config() == [0.28, 5.42]
    assert GuidanceInterval(low=0.43).as_config() == [0.43, None]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, None),
        ([0.43, None], GuidanceInterval(0.43, math.inf)),
        ((None, 2), GuidanceInterval(0.0, 2.0)),
        ([0, 1e3], GuidanceInterval(0.0, 1000.0)),
    ],
)
def test_sampling_options_read_the_interval_with_open_ends(given, expected):
    options = SamplingOptions.checked(diffusion=FLOW, guidance_interval=given)

    assert options.guidance_interval == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("0.4,1", r"guidance_interval='0.4,1' is not an interval; give null"),
        ([0.4], r"is not an interval; give null .* or \[low, high\]"),
        ([2, 1], r"\[2, 1\] is empty or negative: it needs 0 ≤ low < high"),
        ([-1, None], r"\[-1, inf\] is empty or negative"),
        ([True, 2], r"guidance_interval must be a number, got True"),
    ],
)
def test_a_malformed_interval_is_refused_with_the_form_it_takes(given, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions.checked(diffusion=FLOW, guidance_interval=given)
