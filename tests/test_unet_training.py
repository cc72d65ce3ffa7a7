"""Stage 2 end to end: input checks, condition dropout, deterministic validation, checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import compose_config, run_whole_interrupted_and_resumed, synthetic_run_overrides

from ldm.exports import load_unet_export, read_unet_metadata, save_vae_export
from ldm.models.vae import VAE, VAEConfig
from ldm.training.diffusion_module import LatentDiffusionModule
from ldm.training.unet_stage import _adherence_curves, check_inputs_fit, run_unet_stage

TINY_VAE = VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8)
TINY = [
    "experiment=demo",
    "model.denoiser=unet",  # the demo trains a DiT; these runs a tiny U-Net
    "data.image_size=32",
    "data.batch_size=8",
    "model.unet.model_channels=16",
    "model.unet.channel_multipliers=[1,2]",
    "model.unet.transformer_levels=[1]",
    "model.unet.norm_groups=8",
    "model.unet.attention_head_dim=16",
    "validation.prompts=[a red circle,a blue square]",
    "validation.sampling.steps=3",
    "validation.timestep_buckets=2",
    "cache.text_max_positions=8",
    "optim.lr_warmup_steps=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def vae_export(tmp_path_factory) -> Path:
    """A tiny random VAE exported as train_vae.py would, for 32px images."""
    torch.manual_seed(0)
    stats = {
        "channel_mean": [0.0] * 4,
        "channel_std": [1.0] * 4,
        "global_mean": 0.0,
        "global_std": 2.0,
        "scale_factor": 0.5,
        "num_latents": 8,
        "sampled_posterior": True,
    }
    return save_vae_export(
        tmp_path_factory.mktemp("vae") / "export",
        VAE(TINY_VAE),
        latent_stats=stats,
        extra={"image_size": 32},
    )


def tiny_cfg(synthetic_overrides: list[str], vae_export: Path, *extra: str):
    return compose_config(
        "train_unet", [*TINY, *synthetic_overrides, f"vae_export={vae_export}", *extra]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root, vae_export):
    root = tmp_path_factory.mktemp("unet")
    overrides = synthetic_run_overrides(synthetic_root, root)
    cfg = tiny_cfg(overrides, vae_export, "trainer.max_epochs=2")
    return run_unet_stage(cfg, run_dir=root / "runs" / "unet" / "run1"), cfg


def test_training_exports_raw_and_ema_weights_with_everything_sampling_needs(
    trained, vae_export
) -> None:
    result, cfg = trained
    metadata = read_unet_metadata(result.export_dir)
    assert metadata["latent_norm"] == {"kind": "global", "scale_factor": 0.5}
    assert metadata["vae_export"] == str(vae_export.resolve())
    assert metadata["text_encoder"]["pretrained"] is None
    assert metadata["diffusion"]["num_train_timesteps"] == cfg.diffusion.num_train_timesteps
    assert metadata["context_length"] <= 8
    assert metadata["latent_shape"] == [4, 16, 16]
    raw, _ = load_unet_export(result.export_dir, weights="raw")
    ema, _ = load_unet_export(result.export_dir, weights="ema")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(raw.state_dict().values(), ema.state_dict().values(), strict=True)
    )


def test_lightning_checkpoint_records_vae_scale_text_encoder_and_schedule(trained) -> None:
    result, cfg = trained
    state = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    hparams = state["hyper_parameters"]
    assert hparams["latent_norm"] == {"kind": "global", "scale_factor": 0.5}
    assert hparams["provenance"]["vae_weights_sha256"]
    assert hparams["provenance"]["text_encoder"]["model_name"] == cfg.text_encoder.model_name
    assert hparams["diffusion"]["objective"] == cfg.diffusion.objective == "flow_matching"
    assert not any(key.startswith(("text_encoder", "_vae", "vae.")) for key in state["state_dict"])
    assert any(key.startswith("ema.") for key in state["state_dict"])


def test_optimizer_and_lr_schedule_state_survive_the_checkpoint(trained) -> None:
    result, _ = trained
    state = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["optimizer_states"][0]["state"]  # Adam moments are saved
    assert state["lr_schedulers"][0]["last_epoch"] == state["global_step"]


def test_resuming_continues_the_step_count_and_lr_schedule(trained, tmp_path) -> None:
    result, cfg = trained
    last = result.run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    cfg.ckpt_path = str(last)
    cfg.trainer.max_epochs = 3
    cfg.logger.kind = "none"
    resumed = run_unet_stage(cfg, run_dir=tmp_path / "resumed")
    after = torch.load(resumed.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == saved["global_step"] * 3 // 2
    assert after["lr_schedulers"][0]["last_epoch"] == after["global_step"]


def test_sample_grids_are_saved_for_raw_and_ema_weights(trained) -> None:
    result, _ = trained
    assert list((result.run_dir / "images").glob("samples_raw_samples_ema_step*.png"))


def test_validation_loss_is_identical_across_two_evaluations(trained) -> None:
    result, cfg = trained
    state = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    module = LatentDiffusionModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    module.eval()
    width = cfg.model.unet.context_dim
    batch = {
        "latent_mean": torch.randn(6, 4, 16, 16, dtype=torch.float16),
        "latent_std": torch.rand(6, 4, 16, 16, dtype=torch.float16),
        "text_hidden_states": torch.randn(6, 5, width, dtype=torch.float16),
        "diffusion_noise": torch.randn(6, 4, 16, 16),
    }
    with torch.no_grad():
        first, t_first = module.validation_losses(batch)
        torch.manual_seed(123)  # the global RNG must not matter
        second, t_second = module.validation_losses(batch)
    assert torch.equal(first, second) and torch.equal(t_first, t_second)
    # spread over the whole schedule: timesteps in [0, T), or flow matching's σ in [0, 1]
    span = 1.0 if cfg.diffusion.objective == "flow_matching" else cfg.diffusion.num_train_timesteps
    assert t_first.min() < span / 4 and t_first.max() > 3 * span / 4


def test_condition_dropout_replaces_the_configured_fraction_by_the_empty_prompt() -> None:
    module = LatentDiffusionModule(
        unet={
            "model_channels": 16,
            "channel_multipliers": [1],
            "transformer_levels": [0],
            "norm_groups": 8,
            "attention_head_dim": 16,
        },
        diffusion={},
        optim={"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0},
        ema={},
        cond_dropout=0.25,
        latent_norm={"kind": "global", "scale_factor": 1.0},
        latent_shape=[4, 8, 8],
        context_length=3,
        validation={"timestep_buckets": 2},
        provenance={},
    )
    module.empty_context.copy_(torch.full((1, 3, 512), 7.0))
    randomness = module.step_randomness(train=True)
    drawn = randomness.draw(4000, torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}

    class Spy(torch.nn.Module):
        def forward(self, x_t, t, cond):
            seen["cond"] = cond
            return torch.zeros_like(x_t)

    module.unet = Spy()
    context = torch.randn(4000, 3, 512).half()
    module._losses(
        torch.zeros(4000, 4, 8, 8),
        torch.ones(4000, 4, 8, 8),
        drawn["posterior_noise"],
        context,
        drawn["drop_condition"],
        drawn["timesteps"],
        drawn["diffusion_noise"],
    )
    is_empty = (seen["cond"] == 7.0).all(dim=(1, 2))
    assert torch.equal(is_empty, drawn["drop_condition"])
    assert 0.22 < is_empty.float().mean() < 0.28
    assert torch.equal(seen["cond"][~is_empty], context[~is_empty].float())


def test_latent_channel_mismatch_fails_before_training() -> None:
    cfg = compose_config("train_unet", ["model.unet.in_channels=8", "model.unet.out_channels=8"])
    metadata = {
        "model_config": {"latent_channels": 4, "block_channels": [64, 128, 256, 256]},
        "extra": {"image_size": 128},
    }
    with pytest.raises(ValueError, match=r"4 latent channels.*model\.unet\.in_channels=4"):
        check_inputs_fit(cfg, metadata)


def test_image_size_mismatch_fails_before_training() -> None:
    cfg = compose_config("train_unet", ["data.image_size=64"])
    metadata = {
        "model_config": {"latent_channels": 4, "block_channels": [64, 128, 256, 256]},
        "extra": {"image_size": 128},
    }
    with pytest.raises(ValueError, match=r"128px.*data\.image_size=128"):
        check_inputs_fit(cfg, metadata)


def test_missing_vae_export_names_the_command_to_make_it(synthetic_overrides, tmp_path) -> None:
    cfg = compose_config(
        "train_unet", [*TINY, *synthetic_overrides, f"vae_export={tmp_path / 'nowhere'}"]
    )
    with pytest.raises(FileNotFoundError, match=r"train_vae\.py"):
        run_unet_stage(cfg, run_dir=tmp_path / "run")


def test_a_run_resumed_mid_epoch_repeats_the_uninterrupted_one_exactly(
    synthetic_overrides, vae_export, tmp_path, monkeypatch
) -> None:
    """Same batches, noise, timesteps, dropout, LR schedule and EMA: identical final weights."""
    import ldm.training.unet_stage as stage

    common = [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        "trainer.checkpoint_every_n_steps=2",
        "logger=none",
        "cond_dropout=0.5",
    ]
    runs = run_whole_interrupted_and_resumed(
        stage,
        lambda cfg, run_dir: run_unet_stage(cfg, run_dir=run_dir),
        lambda *extra: tiny_cfg(synthetic_overrides, vae_export, *common, *extra),
        tmp_path,
        monkeypatch,
        stop_after_steps=2,
    )
    assert len(runs.whole) == 5 and len(runs.first) == 2
    assert runs.first + runs.resumed == runs.whole
    whole = torch.load(runs.whole_dir / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(runs.resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert whole["global_step"] == resumed["global_step"] == 5  # last.ckpt is the final state
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for name, tensor in whole["state_dict"].items():  # bit for bit (NaN: not yet measured)
        torch.testing.assert_close(
            resumed["state_dict"][name], tensor, rtol=0, atol=0, equal_nan=True, msg=name
        )


def test_prompt_adherence_is_logged_as_a_training_curve(
    synthetic_overrides, vae_export, tmp_path
) -> None:
    cfg = tiny_cfg(
        synthetic_overrides,
        vae_export,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "logger=csv",
        "evaluation.every_n_steps=2",
        "evaluation.prompts_per_split=3",
        "evaluation.sampling.steps=2",
    )
    result = run_unet_stage(cfg, run_dir=tmp_path / "run")
    rows = list(csv.DictReader((result.run_dir / "csv" / "metrics.csv").open()))
    curve = [row for row in rows if row.get("eval/adherence_heldout_background")]
    assert [int(row["step"]) for row in curve] == [1, 3]  # after optimizer steps 2 and 4
    for row in curve:
        for split in ("train", "heldout"):
            for attribute in ("background", "color", "shape", "size"):
                assert 0 <= float(row[f"eval/adherence_{split}_{attribute}"]) <= 1


def test_adherence_curves_refuse_data_that_cannot_be_judged(tmp_path) -> None:
    cfg = compose_config("train_unet", ["data=coco", "evaluation.every_n_steps=100"])
    with pytest.raises(ValueError, match=r"only the synthetic set can judge"):
        _adherence_curves(cfg, text_encoder=None, num_positions=8)
