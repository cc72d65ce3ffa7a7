"""Specification of the Stage-2 U-Net: size, shapes, conditioning, initialisation, training."""

import json
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_config
from omegaconf import OmegaConf
from torch import nn

from ldm.models.blocks import sinusoidal_timestep_embedding
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import count_parameters

CONTEXT_DIM = 16
# Two levels (factor 2), a transformer at the lower one and in the middle: a few 10k parameters.
TINY = UNetConfig(
    model_channels=16,
    channel_multipliers=(1, 2),
    res_blocks_per_level=1,
    transformer_levels=(1,),
    attention_head_dim=8,
    context_dim=CONTEXT_DIM,
    norm_groups=4,
)
# Three levels (factor 4) to check sizes against a deeper stack.
TINY_F4 = UNetConfig(**{**TINY.to_dict(), "channel_multipliers": (1, 2, 2)})
# The caption also pooled into the time embedding.
TINY_POOLED = UNetConfig(**{**TINY.to_dict(), "pooled_text": True})


@pytest.fixture(autouse=True)
def _seeded_on_one_thread() -> Iterator[None]:
    # These tensors are tiny: on shared cores, threads cost far more in synchronisation
    # (seconds per step when another process is busy) than they save.
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(batch: int = 2, size: int = 16, context_length: int = 5, config: UNetConfig = TINY):
    latents = torch.randn(batch, config.in_channels, size, size)
    timesteps = torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, context_length, config.context_dim)
    return latents, timesteps, context


def _with_random_output_conv(model: UNet) -> UNet:
    """The zero-initialised output hides everything inside; a random one makes it visible."""
    nn.init.normal_(model.conv_out.weight, std=0.1)
    return model


# --- size and shapes ----------------------------------------------------------------------


def test_default_config_has_18_to_24_million_parameters() -> None:
    assert 18_000_000 <= count_parameters(UNet(UNetConfig())) <= 24_000_000


def test_default_config_maps_a_16px_latent_batch_with_clip_context_to_the_same_shape() -> None:
    model = UNet(UNetConfig()).eval()
    latents, timesteps, context = _inputs(size=16, context_length=77, config=UNetConfig())
    with torch.no_grad():
        assert model(latents, timesteps, context).shape == (2, 4, 16, 16)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_output_shape_equals_input_for_any_latent_size_divisible_by_the_factor(size: int) -> None:
    latents, timesteps, context = _inputs(size=size, config=TINY_F4)
    with torch.no_grad():
        assert UNet(TINY_F4)(latents, timesteps, context).shape == latents.shape


@pytest.mark.parametrize("context_length", [1, 7, 77])
def test_context_of_any_length_is_accepted(context_length: int) -> None:
    latents, timesteps, context = _inputs(context_length=context_length)
    with torch.no_grad():
        assert UNet(TINY)(latents, timesteps, context).shape == latents.shape


def test_a_single_fractional_timestep_applies_to_the_whole_batch() -> None:
    model = _with_random_output_conv(UNet(TINY))
    latents, _, context = _inputs()
    with torch.no_grad():
        shared = model(latents, 12.5, context)
        per_sample = model(latents, torch.full((2,), 12.5), context)
    torch.testing.assert_close(shared, per_sample)


# --- input checks -------------------------------------------------------------------------


def test_latent_size_not_divisible_by_the_factor_is_refused_naming_the_factor() -> None:
    latents, timesteps, context = _inputs(size=6, config=TINY_F4)
    with pytest.raises(ValueError, match=r"divisible by 4 .* got 6×6"):
        UNet(TINY_F4)(latents, timesteps, context)


def test_context_of_the_wrong_width_is_refused_naming_context_dim() -> None:
    latents, timesteps, _ = _inputs()
    with pytest.raises(ValueError, match=r"\(2, L, 16\).*context_dim"):
        UNet(TINY)(latents, timesteps, torch.randn(2, 5, 512))


def test_timesteps_that_do_not_match_the_batch_are_refused() -> None:
    latents, _, context = _inputs()
    with pytest.raises(ValueError, match=r"timesteps of shape \(2,\)"):
        UNet(TINY)(latents, torch.zeros(3, dtype=torch.long), context)


def test_a_mask_that_hides_a_whole_caption_is_refused() -> None:
    latents, timesteps, context = _inputs()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="hides every token"):
        UNet(TINY)(latents, timesteps, context, context_mask=mask)


# --- configuration ------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    restored = UNetConfig.from_dict(json.loads(json.dumps(TINY_F4.to_dict())))
    assert restored == TINY_F4


def test_unknown_config_keys_are_refused_not_ignored() -> None:
    with pytest.raises(ValueError, match=r"channel_mult=\[1, 2\]: did you mean .*multipliers"):
        UNetConfig.from_dict({"channel_mult": [1, 2]})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_channels": 24, "norm_groups": 32}, "not a multiple of norm_groups=32"),
        ({"transformer_levels": (3,)}, r"levels \[3\] that do not exist"),
        ({"attention_head_dim": 12}, "does not divide the transformer widths"),
        ({"channel_multipliers": ()}, "non-empty list"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_inconsistent_configs_are_refused_with_the_reason(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**TINY.to_dict(), **overrides})


# --- initialisation and conditioning ------------------------------------------------------


def test_untrained_model_predicts_exactly_zero() -> None:
    latents, timesteps, context = _inputs()
    with torch.no_grad():
        assert torch.count_nonzero(UNet(TINY)(latents, timesteps, context)) == 0


def test_changing_the_text_context_changes_the_prediction() -> None:
    model = _with_random_output_conv(UNet(TINY)).eval()
    latents, timesteps, context = _inputs()
    with torch.no_grad():
        difference = model(latents, timesteps, context) - model(latents, timesteps, -context)
    assert difference.abs().mean() > 1e-3


def test_changing_the_timestep_changes_the_prediction() -> None:
    model = _with_random_output_conv(UNet(TINY)).eval()
    latents, _, context = _inputs()
    with torch.no_grad():
        difference = model(latents, 10, context) - model(latents, 900, context)
    assert difference.abs().mean() > 1e-3


@pytest.mark.parametrize("config", [TINY, TINY_POOLED], ids=["cross_attention", "pooled_text"])
def test_masked_context_tokens_do_not_affect_the_prediction(config: UNetConfig) -> None:
    model = _with_random_output_conv(UNet(config)).eval()
    latents, timesteps, context = _inputs(context_length=6)
    mask = torch.tensor([[True] * 3 + [False] * 3] * 2)
    padded_differently = context.clone()
    padded_differently[:, 3:] = torch.randn(2, 3, CONTEXT_DIM)
    with torch.no_grad():
        reference = model(latents, timesteps, context, context_mask=mask)
        other_padding = model(latents, timesteps, padded_differently, context_mask=mask)
        truncated = model(latents, timesteps, context[:, :3])
    torch.testing.assert_close(other_padding, reference)
    torch.testing.assert_close(truncated, reference)


@pytest.mark.parametrize("config", [TINY, TINY_POOLED], ids=["cross_attention", "pooled_text"])
def test_every_parameter_receives_a_gradient(config: UNetConfig) -> None:
    # DDP needs every parameter used in each step; an unused one also means a wiring bug.
    model = _with_random_output_conv(UNet(config))
    latents, timesteps, context = _inputs()
    model(latents, timesteps, context).square().mean().backward()
    without_gradient = [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is None or torch.count_nonzero(parameter.grad) == 0
    ]
    assert without_gradient == []


def test_pooled_text_reaches_every_residual_block_through_the_time_embedding() -> None:
    model = UNet(TINY_POOLED).eval()
    latents, timesteps, context = _inputs()
    seen: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[1]))
        for module in model.modules()
        if type(module).__name__ == "ResnetBlock"
    ]
    with torch.no_grad():
        model(latents, timesteps, context)
        model(latents, timesteps, -context)
    for hook in hooks:
        hook.remove()
    half = len(seen) // 2
    assert half == len(hooks) > 0
    for first, second in zip(seen[:half], seen[half:], strict=True):
        assert (first - second).abs().max() > 1e-4


def test_configs_written_before_pooled_text_load_without_it() -> None:
    values = TINY.to_dict()
    del values["pooled_text"]
    assert UNetConfig.from_dict(values).pooled_text is False


def test_timestep_embedding_separates_neighbouring_timesteps_and_is_bounded() -> None:
    embedding = sinusoidal_timestep_embedding(torch.tensor([0, 1, 999]), dim=32)
    assert embedding.shape == (3, 32)
    assert embedding.abs().max() <= 1.0
    assert (embedding[0] - embedding[1]).norm() > 0.1


# --- training -----------------------------------------------------------------------------


def test_tiny_model_overfits_a_fixed_batch() -> None:
    model = UNet(TINY)
    latents, timesteps, context = _inputs(batch=4, size=8)
    target_noise = torch.randn_like(latents)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = F.mse_loss(model(latents, timesteps, context), target_noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 100


@pytest.mark.parametrize(
    ("overrides", "min_parameters", "max_parameters"),
    [([], 18_000_000, 24_000_000), (["experiment=demo"], 1_000_000, 3_000_000)],
)
def test_model_configs_in_conf_build_a_unet_of_the_intended_size(
    overrides: list[str], min_parameters: int, max_parameters: int
) -> None:
    model_config = compose_config("train_vae", overrides).model
    config = UNetConfig.from_dict(OmegaConf.to_container(model_config.unet))
    assert config.in_channels == model_config.vae.latent_channels
    assert min_parameters <= count_parameters(UNet(config)) <= max_parameters
