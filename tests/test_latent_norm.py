"""Latent normalisation (``latent_norm=global|per_channel``): the transform, its record in the
U-Net export, the training stage and sampling with it, and the values it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_LATENT_SHAPE,
    TINY_VAE_CONFIG,
    compose_config,
    synthetic_run_overrides,
    tiny_diffusion_module,
)
from helpers import TINY_UNET_RUN as TINY_UNET_OVERRIDES

from ldm.diffusion import NoiseSchedule, ScheduleConfig
from ldm.exports import load_unet_for_sampling, save_unet_export, save_vae_export
from ldm.latent_norm import LatentNormalizer
from ldm.models.vae import VAE
from ldm.pipeline import LatentDiffusionPipeline
from ldm.sampling import run_sampling
from ldm.training.unet_stage import run_unet_stage

# The spread the issue reports for a default-size VAE on 128 px shapes, with made-up means.
CHANNEL_MEAN = [0.4, -0.3, 0.1, -0.05]
CHANNEL_STD = [0.15, 0.61, 0.81, 1.0]
PER_CHANNEL = {"kind": "per_channel", "channel_mean": CHANNEL_MEAN, "channel_std": CHANNEL_STD}
GLOBAL = {"kind": "global", "scale_factor": 0.8}
VAE_STATS = {
    "channel_mean": CHANNEL_MEAN,
    "channel_std": CHANNEL_STD,
    "global_mean": 0.04,
    "global_std": 0.7,
    "scale_factor": 1 / 0.7,
    "num_latents": 8,
    "sampled_posterior": True,
}
PROVENANCE = {
    "vae_export": "/runs/vae/run1/export",
    "vae_weights_sha256": "0" * 64,
    "text_encoder": {"model_name": "ViT-B-32"},
    "image_size": 32,
}


def latents_with_known_stats(count: int = 512) -> torch.Tensor:
    """(count, 4, 8, 8) latents drawn with CHANNEL_MEAN and CHANNEL_STD per channel."""
    noise = torch.randn(count, *TINY_LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(CHANNEL_MEAN), torch.tensor(CHANNEL_STD)
    return mean[:, None, None] + std[:, None, None] * noise


# ---- the transform --------------------------------------------------------------------------


@pytest.mark.parametrize("description", [GLOBAL, PER_CHANNEL], ids=["global", "per_channel"])
def test_normalize_and_denormalize_invert_each_other(description) -> None:
    normalizer = LatentNormalizer(description)
    z = latents_with_known_stats(16)
    torch.testing.assert_close(normalizer.denormalize(normalizer.normalize(z)), z)
    torch.testing.assert_close(normalizer.normalize(normalizer.denormalize(z)), z)


def test_per_channel_makes_each_channel_zero_mean_and_unit_std() -> None:
    normalized = LatentNormalizer(PER_CHANNEL).normalize(latents_with_known_stats())
    per_channel = normalized.transpose(0, 1).flatten(1)  # (C, N·h·w)
    assert per_channel.mean(1).tolist() == pytest.approx(
        [0.0] * 4, abs=0.03
    )  # 5σ of a mean of 32768
    assert per_channel.std(1).tolist() == pytest.approx([1.0] * 4, rel=0.02)


def test_global_is_exactly_the_single_scale_factor_of_before() -> None:
    """Existing runs and exports keep their meaning: z · scale_factor, and back by division."""
    normalizer = LatentNormalizer.global_scale(0.8)
    z = latents_with_known_stats(4)
    assert torch.equal(normalizer.normalize(z), z * 0.8)
    assert torch.equal(normalizer.denormalize(z), z / 0.8)


def test_normalizer_works_in_the_latents_dtype_and_adds_nothing_to_state_dicts() -> None:
    normalizer = LatentNormalizer(PER_CHANNEL)
    half = latents_with_known_stats(2).half()
    assert normalizer.normalize(half).dtype == torch.float16
    assert normalizer.state_dict() == {}
    module = tiny_diffusion_module(latent_norm=PER_CHANNEL)
    assert not any("normalizer" in key for key in module.state_dict())


def test_training_and_validation_losses_see_per_channel_normalised_latents() -> None:
    """A per-channel module on z gives the losses of a scale-1 module on the normalised z."""
    per_channel = tiny_diffusion_module(latent_norm=PER_CHANNEL)
    identity = tiny_diffusion_module(latent_norm={"kind": "global", "scale_factor": 1.0})
    z = latents_with_known_stats(8)
    normalized = LatentNormalizer(PER_CHANNEL).normalize(z)
    randomness = per_channel.step_randomness(train=True).draw(8, torch.Generator().manual_seed(1))
    text = {"text_hidden_states": torch.randn(8, 3, 16)}

    def batch(latents: torch.Tensor) -> dict[str, torch.Tensor]:
        # latent_std 0: the posterior sample is its mean, so both modules see the same z.
        return {"latent_mean": latents, "latent_std": torch.zeros_like(latents)} | text

    with torch.no_grad():
        trained = per_channel.training_step(batch(z) | randomness, 0)
        expected = identity.training_step(batch(normalized) | randomness, 0)
        validated, _ = per_channel.validation_losses(batch(z) | randomness)
        expected_validation, _ = identity.validation_losses(batch(normalized) | randomness)
    torch.testing.assert_close(trained, expected)
    torch.testing.assert_close(validated, expected_validation)


def test_img2img_encodes_to_normalised_latents_and_decoding_undoes_them() -> None:
    torch.manual_seed(0)
    vae = VAE(TINY_VAE_CONFIG).eval()
    normalizer = LatentNormalizer(PER_CHANNEL)
    pipeline = LatentDiffusionPipeline(
        unet=torch.nn.Identity(),
        vae=vae,
        text_encoder=None,
        schedule=NoiseSchedule(ScheduleConfig()),
        latent_normalizer=normalizer,
        latent_shape=(4, 16, 16),
        context_length=3,
    )
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior_mean = vae.encode(images).mode()
        encoded = pipeline.encode_images(images)
        torch.testing.assert_close(encoded, normalizer.normalize(posterior_mean))
        torch.testing.assert_close(
            pipeline.decode_latents(encoded), vae.decode(posterior_mean).clamp(-1, 1)
        )


# ---- the record in the U-Net export ---------------------------------------------------------


def write_checkpoint(module, path: Path) -> Path:
    """A Lightning checkpoint as train_unet.py writes it (with its export entry)."""
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def test_per_channel_statistics_round_trip_through_the_export_and_the_checkpoint(
    tmp_path,
) -> None:
    module = tiny_diffusion_module(latent_norm=PER_CHANNEL, provenance=PROVENANCE)
    folder = save_unet_export(tmp_path / "export", module.export())
    ckpt = write_checkpoint(module, tmp_path / "checkpoints" / "last.ckpt")
    z = latents_with_known_stats(2)
    for source in (folder, ckpt):
        normalizer = load_unet_for_sampling(source).latent_normalizer
        assert normalizer.describe() == PER_CHANNEL
        assert torch.equal(normalizer.normalize(z), module.latent_normalizer.normalize(z))


def test_an_export_recording_only_latent_scale_loads_as_global(tmp_path) -> None:
    """U-Net exports written before latent_norm existed record one float, latent_scale."""
    module = tiny_diffusion_module(latent_norm=GLOBAL, provenance=PROVENANCE)
    folder = save_unet_export(tmp_path / "export", module.export())
    metadata_path = folder / "unet.json"
    metadata = json.loads(metadata_path.read_text())
    del metadata["latent_norm"]
    metadata["latent_scale"] = 0.25
    metadata_path.write_text(json.dumps(metadata))
    normalizer = load_unet_for_sampling(folder).latent_normalizer
    assert normalizer.describe() == {"kind": "global", "scale_factor": 0.25}
    z = latents_with_known_stats(2)
    assert torch.equal(normalizer.normalize(z), z * 0.25)


def test_an_export_whose_statistics_do_not_fit_its_latents_is_refused(tmp_path) -> None:
    module = tiny_diffusion_module(latent_norm=PER_CHANNEL, provenance=PROVENANCE)
    folder = save_unet_export(tmp_path / "export", module.export())
    metadata = json.loads((folder / "unet.json").read_text())
    metadata["latent_norm"]["channel_std"] = CHANNEL_STD[:3]
    metadata["latent_norm"]["channel_mean"] = CHANNEL_MEAN[:3]
    (folder / "unet.json").write_text(json.dumps(metadata))
    with pytest.raises(
        ValueError, match=r"export records a latent_norm.*3 channels, but the latents have 4"
    ):
        load_unet_for_sampling(folder)


# ---- the stage trains and samples with it -----------------------------------------------------


@pytest.fixture(scope="module")
def per_channel_vae(tmp_path_factory) -> Path:
    """A tiny random VAE exported with the issue's per-channel spread."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = VAE(TINY_VAE_CONFIG)
    directory = tmp_path_factory.mktemp("vae") / "export"
    return save_vae_export(directory, vae, latent_stats=VAE_STATS, extra={"image_size": 32})


def unet_cfg(synthetic_root: Path, root: Path, vae_export: Path, *extra: str):
    return compose_config(
        "train_unet",
        [
            *TINY_UNET_OVERRIDES,
            *synthetic_run_overrides(synthetic_root, root),
            f"vae_export={vae_export}",
            "data.batch_size=8",
            "validation.prompts=[a red circle]",
            "validation.sampling.steps=2",
            "cache.text_max_positions=8",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "logger=none",
            *extra,
        ],
    )


def test_per_channel_trains_on_cpu_and_its_export_samples(
    synthetic_root, per_channel_vae, tmp_path
) -> None:
    cfg = unet_cfg(synthetic_root, tmp_path, per_channel_vae, "latent_norm=per_channel")
    result = run_unet_stage(cfg, run_dir=tmp_path / "runs" / "unet" / "run")
    assert math.isfinite(result.final_metrics["val/loss"])
    checkpoint = load_unet_for_sampling(result.export_dir)
    assert checkpoint.latent_normalizer.describe() == PER_CHANNEL

    sample_cfg = compose_config(
        "sample",
        [
            f"ckpt={result.export_dir}",
            f"out_dir={tmp_path / 'samples'}",
            "trainer=cpu",
            "prompt='a red circle'",
            "n=1",
            "steps=2",
            "progress=false",
        ],
    )
    sampled = run_sampling(sample_cfg)
    assert len(sampled.image_paths) == 1 and sampled.image_paths[0].is_file()


def test_the_default_is_global() -> None:
    assert compose_config("train_unet").latent_norm == "global"


# ---- what is refused, at the boundary -----------------------------------------------------------


def test_an_unknown_latent_norm_stops_the_run_before_any_caching(
    synthetic_root, per_channel_vae, tmp_path
) -> None:
    cfg = unet_cfg(synthetic_root, tmp_path, per_channel_vae, "latent_norm=foo")
    with pytest.raises(ValueError, match=r"latent_norm='foo' is not one of global \| per_channel"):
        run_unet_stage(cfg, run_dir=tmp_path / "run")
    assert not Path(cfg.cache.dir).exists()


def test_vae_statistics_without_channel_stats_are_refused_for_per_channel() -> None:
    stats = {key: value for key, value in VAE_STATS.items() if key != "channel_std"}
    with pytest.raises(ValueError, match=r"lack \['channel_std'\].*latent_norm=global"):
        LatentNormalizer.from_latent_stats("per_channel", stats, latent_channels=4)
    assert LatentNormalizer.from_latent_stats("global", stats, latent_channels=4).describe() == {
        "kind": "global",
        "scale_factor": VAE_STATS["scale_factor"],
    }


@pytest.mark.parametrize("bad_std", [0.0, -0.5, math.nan, math.inf])
def test_a_channel_std_that_is_not_finite_and_positive_is_refused(bad_std: float) -> None:
    stats = VAE_STATS | {"channel_std": [1.0, bad_std, 1.0, 1.0]}
    with pytest.raises(ValueError, match=r"finite, positive channel stds.*channels \[1\]"):
        LatentNormalizer.from_latent_stats("per_channel", stats, latent_channels=4)


@pytest.mark.parametrize("bad_scale", [0.0, -1.0, math.inf])
def test_a_global_scale_factor_that_is_not_finite_and_positive_is_refused(bad_scale) -> None:
    with pytest.raises(ValueError, match=r"scale_factor=.* must be finite and positive"):
        LatentNormalizer.global_scale(bad_scale)


def test_statistics_of_another_channel_count_are_refused() -> None:
    with pytest.raises(ValueError, match=r"describe 4 channels, but the latents have 8"):
        LatentNormalizer.from_latent_stats("per_channel", VAE_STATS, latent_channels=8)
