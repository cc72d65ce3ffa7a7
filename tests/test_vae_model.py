"""Specification of the Stage-1 VAE: shapes, configuration, posterior, loss and blocks."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ldm.models import VAE, DiagonalGaussian, VAEConfig, count_parameters, vae_loss
from ldm.models.blocks import Downsample, ResnetBlock, SelfAttention2d, Upsample, group_norm

# Four levels like the default (downsample factor 8) but a few thousand parameters.
TINY_F8 = VAEConfig(block_channels=(8, 8, 16, 16), layers_per_block=1, norm_groups=4)
# Two levels (factor 2) for the tests that train.
TINY_F2 = VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _posterior(mean: float, logvar: float, shape: tuple[int, ...] = (2, 4, 3, 3)):
    return DiagonalGaussian(torch.full(shape, mean), torch.full(shape, logvar))


# --- shapes -----------------------------------------------------------------------------


def test_default_config_maps_128px_images_to_16px_latents_and_back() -> None:
    vae = VAE(VAEConfig()).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        posterior = vae.encode(images)
        reconstruction = vae.decode(posterior.sample())
    assert posterior.mean.shape == (2, 4, 16, 16)
    assert reconstruction.shape == (2, 3, 128, 128)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 96), (64, 96)])
def test_any_size_divisible_by_the_downsample_factor_round_trips(height: int, width: int) -> None:
    vae = VAE(TINY_F8)
    with torch.no_grad():
        reconstruction, posterior = vae(torch.randn(2, 3, height, width))
    assert posterior.mean.shape == (2, 4, height // 8, width // 8)
    assert reconstruction.shape == (2, 3, height, width)


def test_downsample_factor_doubles_with_each_extra_level() -> None:
    assert VAE(TINY_F2).downsample_factor == 2
    assert VAE(TINY_F8).downsample_factor == 8


def test_image_size_not_divisible_by_the_factor_is_refused_naming_the_factor() -> None:
    with pytest.raises(ValueError, match=r"divisible by 8 .* got 60×64"):
        VAE(TINY_F8).encode(torch.randn(1, 3, 60, 64))


def test_images_with_the_wrong_channel_count_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(1, 1, 64, 64\)"):
        VAE(TINY_F8).encode(torch.randn(1, 1, 64, 64))


def test_latents_with_the_wrong_channel_count_are_refused_by_decode() -> None:
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\), got \(1, 3, 8, 8\)"):
        VAE(TINY_F8).decode(torch.randn(1, 3, 8, 8))


def test_forward_without_sampling_decodes_the_posterior_mean() -> None:
    vae = VAE(TINY_F8).eval()
    with torch.no_grad():
        reconstruction, posterior = vae(torch.randn(2, 3, 64, 64), sample_posterior=False)
        assert torch.equal(reconstruction, vae.decode(posterior.mean))


def test_forward_decodes_mean_plus_std_times_noise_drawn_from_the_given_generator() -> None:
    vae = VAE(TINY_F8).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reconstruction, posterior = vae(images, generator=torch.Generator().manual_seed(7))
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
        expected = vae.decode(posterior.mean + posterior.std * noise)
    assert torch.equal(reconstruction, expected)


def test_mid_attention_can_be_switched_off() -> None:
    def has_attention(vae: VAE) -> bool:
        return any(isinstance(module, SelfAttention2d) for module in vae.modules())

    assert has_attention(VAE(TINY_F8))
    without = VAE(VAEConfig(**{**TINY_F8.to_dict(), "mid_attention": False}))
    assert not has_attention(without)


# --- configuration ------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    config = VAEConfig(block_channels=(32, 64), mid_attention=False, logvar_min=-10.0)
    assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match="latent_chanels"):
        VAEConfig.from_dict({"latent_chanels": 4})


def test_config_refuses_block_channels_not_divisible_by_norm_groups() -> None:
    with pytest.raises(ValueError, match=r"\[48\] .* norm_groups=32"):
        VAEConfig(block_channels=(64, 48))


def test_config_refuses_logvar_bounds_in_the_wrong_order() -> None:
    with pytest.raises(ValueError, match="logvar_min < logvar_max"):
        VAEConfig(logvar_min=5.0, logvar_max=-5.0)


# --- posterior ----------------------------------------------------------------------------


def test_kl_is_zero_for_a_standard_normal_posterior() -> None:
    assert torch.equal(_posterior(mean=0.0, logvar=0.0).kl(), torch.zeros(2))


@pytest.mark.parametrize(("mean", "logvar"), [(0.5, 0.0), (0.0, 1.0), (0.0, -1.0), (-2.0, 0.3)])
def test_kl_is_positive_for_any_other_posterior(mean: float, logvar: float) -> None:
    assert (_posterior(mean, logvar).kl() > 0).all()


def test_kl_is_summed_over_latent_dims_per_sample() -> None:
    # Each dim with mean 1, var 1 contributes ½·1²; 4·16·16 dims give 512 per sample.
    kl = _posterior(mean=1.0, logvar=0.0, shape=(3, 4, 16, 16)).kl()
    assert kl.shape == (3,)
    assert torch.allclose(kl, torch.full((3,), 512.0))


def test_logvar_is_clamped_so_extreme_encoder_outputs_stay_finite() -> None:
    posterior = DiagonalGaussian(
        torch.zeros(1, 2), torch.tensor([[-1000.0, 1000.0]]), logvar_min=-30.0, logvar_max=20.0
    )
    assert posterior.logvar.tolist() == [[-30.0, 20.0]]
    assert torch.isfinite(posterior.std).all()
    assert torch.isfinite(posterior.kl()).all()


def test_samples_have_the_posterior_mean_and_std() -> None:
    samples = _posterior(mean=3.0, logvar=math.log(4.0), shape=(64, 4, 16, 16)).sample()
    assert samples.mean().item() == pytest.approx(3.0, abs=0.02)
    assert samples.std().item() == pytest.approx(2.0, abs=0.02)


# --- loss and training ----------------------------------------------------------------------


def test_loss_is_per_pixel_mse_plus_weighted_per_sample_kl() -> None:
    reconstruction, target = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    posterior = _posterior(mean=1.0, logvar=0.0, shape=(2, 4, 2, 2))  # KL 8 per sample
    losses = vae_loss(reconstruction, target, posterior, kl_weight=0.1)
    assert losses["recon"].item() == pytest.approx(0.25)
    assert losses["kl"].item() == pytest.approx(8.0)
    assert losses["total"].item() == pytest.approx(0.25 + 0.1 * 8.0)


def test_loss_refuses_reconstruction_and_target_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        vae_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), _posterior(0.0, 0.0), 1e-5)


def test_a_few_adam_steps_reduce_the_loss() -> None:
    vae = VAE(TINY_F2)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    # Smooth images (upsampled 4×4 noise) in [-1, 1]: learnable through a 2× bottleneck.
    images = F.interpolate(torch.rand(4, 3, 4, 4) * 2 - 1, size=16, mode="bilinear")
    losses = []
    for _ in range(15):
        reconstruction, posterior = vae(images)
        loss = vae_loss(reconstruction, images, posterior, kl_weight=1e-5)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_default_config_parameter_count_is_in_a_sane_range() -> None:
    num_parameters = count_parameters(VAE(VAEConfig()))
    print(f"default VAE parameters: {num_parameters:,}")
    assert 5_000_000 < num_parameters < 60_000_000


# --- blocks -------------------------------------------------------------------------------


def test_group_norm_refuses_channels_not_divisible_by_groups() -> None:
    with pytest.raises(ValueError, match="channels=48, groups=32"):
        group_norm(48)


def test_resnet_block_changes_width_through_its_skip_projection() -> None:
    block = ResnetBlock(8, 16, groups=4)
    assert block(torch.randn(2, 8, 5, 5)).shape == (2, 16, 5, 5)


def test_resnet_block_output_depends_on_the_time_embedding() -> None:
    block = ResnetBlock(8, 8, time_emb_ch=6, groups=4)
    x = torch.randn(2, 8, 5, 5)
    assert not torch.allclose(block(x, torch.randn(2, 6)), block(x, torch.randn(2, 6)))


def test_resnet_block_built_for_time_refuses_a_missing_embedding() -> None:
    with pytest.raises(ValueError, match="needs a time embedding"):
        ResnetBlock(8, 8, time_emb_ch=6, groups=4)(torch.randn(2, 8, 5, 5))


def test_resnet_block_built_without_time_refuses_an_embedding() -> None:
    with pytest.raises(ValueError, match="without time_emb_ch"):
        ResnetBlock(8, 8, groups=4)(torch.randn(2, 8, 5, 5), torch.randn(2, 6))


def test_downsample_halves_and_upsample_doubles_height_and_width() -> None:
    x = torch.randn(2, 8, 12, 6)
    assert Downsample(8)(x).shape == (2, 8, 6, 3)
    assert Upsample(8)(x).shape == (2, 8, 24, 12)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_self_attention_keeps_the_feature_map_shape(heads: int) -> None:
    x = torch.randn(2, 8, 3, 5)
    assert SelfAttention2d(8, groups=4, heads=heads)(x).shape == x.shape


def test_self_attention_mixes_information_across_all_positions() -> None:
    attention = SelfAttention2d(8, groups=4)
    x = torch.randn(1, 8, 4, 4)
    changed = x.clone()
    changed[..., 3, 3] += 1.0  # touch only the far corner
    corner_effect = attention(changed)[..., 0, 0] - attention(x)[..., 0, 0]
    assert corner_effect.abs().max() > 0


def test_self_attention_refuses_heads_that_do_not_divide_channels() -> None:
    with pytest.raises(ValueError, match="channels=8, heads=3"):
        SelfAttention2d(8, groups=4, heads=3)
