"""ScheduleConfig: built from the YAML config group, and bad values refused with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.diffusion import ScheduleConfig

CONFIG_FILE = Path(__file__).resolve().parents[1] / "conf" / "diffusion" / "default.yaml"


def test_builds_from_an_omegaconf_node_with_overrides():
    override = {"prediction_type": "epsilon", "rescale_zero_terminal_snr": False}
    node = OmegaConf.merge(OmegaConf.load(CONFIG_FILE), override)

    assert ScheduleConfig(**node).prediction_type == "epsilon"


def test_default_linear_range_is_the_reference_range_scaled_by_1000_over_t():
    assert ScheduleConfig().beta_range == pytest.approx((5e-4, 0.1))
    assert ScheduleConfig(num_train_timesteps=1000).beta_range == pytest.approx((1e-4, 0.02))


def test_explicit_endpoints_override_the_defaults():
    assert ScheduleConfig(beta_start=1e-4, beta_end=0.02).beta_range == (1e-4, 0.02)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"beta_schedule": "quadratic"},
            "beta_schedule='quadratic'.*linear, scaled_linear, cosine",
        ),
        ({"prediction_type": "sample"}, "prediction_type='sample'.*epsilon, v_prediction"),
        ({"loss_weighting": "p2"}, "loss_weighting='p2'.*mse, min_snr"),
        ({"num_train_timesteps": 1}, "num_train_timesteps must be an integer ≥ 2, got 1"),
        ({"num_train_timesteps": 200.0}, "num_train_timesteps must be an integer ≥ 2, got 200.0"),
        ({"min_snr_gamma": 0}, "min_snr_gamma must be a positive number, got 0"),
        ({"rescale_zero_terminal_snr": "yes"}, "must be true or false, got 'yes'"),
        ({"beta_start": "1e-4"}, "beta_start must be a number or null, got '1e-4'"),
        ({"beta_start": 0.03, "beta_end": 0.02}, "beta_start=0.03, beta_end=0.02"),
        ({"num_train_timesteps": 10}, r"beta_end=2 \(T=10"),
        ({"beta_schedule": "cosine", "beta_end": 0.02}, "cosine.*takes no β endpoints"),
        ({"prediction_type": "epsilon"}, "prediction_type=v_prediction, or turn"),
    ],
    ids=[
        "unknown_schedule",
        "unknown_prediction",
        "unknown_weighting",
        "too_few_timesteps",
        "float_timesteps",
        "non_positive_gamma",
        "non_bool_rescale",
        "string_beta",
        "start_above_end",
        "default_beta_reaching_one",
        "cosine_with_endpoints",
        "zero_snr_with_epsilon",
    ],
)
def test_invalid_config_is_refused_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**overrides)


def test_unknown_key_is_refused():
    with pytest.raises(TypeError, match="beta_max"):
        ScheduleConfig(beta_max=0.02)
