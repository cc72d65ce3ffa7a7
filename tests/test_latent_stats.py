"""Specification of latent statistics: streaming moments, the scale factor, frozen encoding."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ldm.exports import load_vae_export, save_vae_export
from ldm.latent_stats import LATENT_STAT_KEYS, measure_latent_statistics, scale_factor_from_std
from ldm.models import VAE, DiagonalGaussian, VAEConfig

CHANNEL_MEANS = torch.tensor([0.0, 1.0, -1.0, 2.0])
CHANNEL_STDS = torch.tensor([0.5, 1.0, 2.0, 4.0])


class IdentityEncoder(nn.Module):
    """Stands in for a VAE: the posterior mean is the input itself, with a chosen std, so
    the latents' distribution is known exactly."""

    def __init__(self, posterior_std: float = 1.0) -> None:
        super().__init__()
        self.posterior_logvar = 2 * math.log(posterior_std)
        self.seen_modes: list[tuple[bool, bool]] = []  # (training, grad enabled) per call

    def encode(self, images: Tensor) -> DiagonalGaussian:
        self.seen_modes.append((self.training, torch.is_grad_enabled()))
        return DiagonalGaussian(images, torch.full_like(images, self.posterior_logvar))


def _known_latents(batch_sizes: list[int]) -> list[Tensor]:
    """Batches (B, 4, 8, 8) whose channels have the means and stds above."""
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(size, 4, 8, 8, generator=generator) * CHANNEL_STDS[:, None, None]
        + CHANNEL_MEANS[:, None, None]
        for size in batch_sizes
    ]


def _means_with_std_4() -> list[Tensor]:
    """Four batches of N(0, 16) posterior means, drawn from their own seed: never the same
    numbers as the posterior noise (which a global seed of 0 would give)."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(64, 4, 8, 8, generator=generator) * 4 for _ in range(4)]


def _measure(encoder: nn.Module, batches: list, **kwargs: object) -> dict:
    return measure_latent_statistics(encoder, batches, max_batches=None, device="cpu", **kwargs)


def test_streamed_stats_equal_a_direct_computation_over_all_latents() -> None:
    batches = _known_latents([3, 1, 7, 2])  # uneven sizes exercise the merge
    stats = _measure(IdentityEncoder(), batches, sample_posterior=False)
    everything = torch.cat(batches).double()
    per_channel = everything.transpose(0, 1).flatten(1)  # (C, N·h·w)
    assert stats["channel_mean"] == pytest.approx(per_channel.mean(1).tolist(), abs=1e-12)
    assert stats["channel_std"] == pytest.approx(per_channel.std(1, correction=0).tolist())
    assert stats["global_mean"] == pytest.approx(everything.mean().item(), abs=1e-12)
    assert stats["global_std"] == pytest.approx(everything.std(correction=0).item())
    assert stats["num_latents"] == 13


def test_scale_factor_is_one_over_the_global_std_of_known_latents() -> None:
    stats = _measure(IdentityEncoder(), _known_latents([64] * 8), sample_posterior=False)
    # Global variance = mean within-channel variance + variance of the channel means.
    expected_std = math.sqrt(
        (CHANNEL_STDS.square().mean() + CHANNEL_MEANS.var(correction=0)).item()
    )
    assert stats["channel_mean"] == pytest.approx(CHANNEL_MEANS.tolist(), abs=0.1)
    assert stats["channel_std"] == pytest.approx(CHANNEL_STDS.tolist(), rel=0.02)
    assert stats["scale_factor"] == pytest.approx(1 / expected_std, rel=0.02)


def test_posterior_samples_are_measured_by_default_so_their_noise_counts() -> None:
    # Means with std 4 plus posterior noise with std 3: sampled z has std 5.
    batches = _means_with_std_4()
    stats = _measure(IdentityEncoder(posterior_std=3.0), batches)
    assert stats["sampled_posterior"] is True
    assert stats["global_std"] == pytest.approx(5.0, rel=0.02)
    assert stats["scale_factor"] == pytest.approx(1 / 5.0, rel=0.02)


def test_posterior_means_are_measured_when_sampling_is_off() -> None:
    batches = _means_with_std_4()
    stats = _measure(IdentityEncoder(posterior_std=3.0), batches, sample_posterior=False)
    assert stats["sampled_posterior"] is False
    assert stats["global_std"] == pytest.approx(4.0, rel=0.02)


def test_posterior_samples_are_drawn_in_order_from_a_generator_seeded_by_seed() -> None:
    encoder, batches = IdentityEncoder(posterior_std=2.0), _known_latents([4, 4])
    generator = torch.Generator().manual_seed(3)
    drawn = [encoder.encode(batch).sample(generator) for batch in batches]

    measured = _measure(encoder, batches, seed=3)

    of_the_draws = _measure(IdentityEncoder(), drawn, sample_posterior=False)
    assert measured == of_the_draws | {"sampled_posterior": True}
    assert measured != _measure(encoder, batches, seed=4)


def test_dict_batches_are_read_from_their_image_key() -> None:
    batches = _known_latents([2, 2])
    from_dicts = _measure(IdentityEncoder(), [{"image": b, "caption": "x"} for b in batches])
    assert from_dicts == _measure(IdentityEncoder(), batches)


def test_batches_without_images_are_refused_naming_what_was_found() -> None:
    with pytest.raises(TypeError, match=r"got \['caption'\]"):
        _measure(IdentityEncoder(), [{"caption": "a cat"}])


def test_max_batches_limits_how_many_batches_are_read() -> None:
    stats = measure_latent_statistics(
        IdentityEncoder(), _known_latents([2, 3, 5]), max_batches=2, device="cpu"
    )
    assert stats["num_latents"] == 5


def test_an_empty_loader_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="data loader was empty"):
        _measure(IdentityEncoder(), [])


def test_the_encoder_runs_in_eval_mode_without_gradients_then_is_restored() -> None:
    encoder = IdentityEncoder().train()
    _measure(encoder, _known_latents([2, 2]))
    assert encoder.seen_modes == [(False, False), (False, False)]
    assert encoder.training


def test_stats_of_a_real_vae_cover_its_latent_channels_and_fit_the_export(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4))
    stats = _measure(vae, [torch.randn(2, 3, 8, 8) for _ in range(3)])
    assert set(stats) == set(LATENT_STAT_KEYS)
    assert len(stats["channel_std"]) == 4
    save_vae_export(tmp_path, vae, latent_stats=stats)
    _, metadata = load_vae_export(tmp_path)
    assert metadata["latent_stats"] == json.loads(json.dumps(stats))


def test_scale_factor_from_std_is_its_reciprocal() -> None:
    assert scale_factor_from_std(4.0) == 0.25


@pytest.mark.parametrize("std", [0.0, -1.0, math.nan, math.inf])
def test_scale_factor_from_std_refuses_non_positive_or_non_finite_std(std: float) -> None:
    with pytest.raises(ValueError, match=f"got {std}"):
        scale_factor_from_std(std)
