"""Stage 1 end to end: training, checkpoints, resumption, latent statistics, export, logging."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config, run_whole_interrupted_and_resumed, synthetic_run_overrides

from ldm.exports import load_vae_export
from ldm.training.vae_module import VAEModule
from ldm.training.vae_stage import run_vae_stage

TINY = [
    "experiment=demo",
    "data.image_size=32",
    "data.batch_size=4",
    "model.vae.block_channels=[16,32]",
    "model.vae.norm_groups=8",
    "logging.num_images=3",
    "latent_stats.max_batches=2",
]


def tiny_cfg(synthetic_overrides: list[str], *extra: str):
    return compose_config("train_vae", [*TINY, *synthetic_overrides, *extra])


def test_fast_dev_run_composes_and_runs_the_demo_config(synthetic_overrides, tmp_path) -> None:
    cfg = tiny_cfg(synthetic_overrides, "debug=fdr")
    result = run_vae_stage(cfg, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert result.latent_stats == {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """One short real training run, shared by the tests that inspect its outputs."""
    root = tmp_path_factory.mktemp("trained")
    overrides = synthetic_run_overrides(synthetic_root, root)
    cfg = tiny_cfg(
        overrides,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.log_every_n_steps=1",
    )
    run_dir = root / "runs" / "vae" / "run1"
    return run_vae_stage(cfg, run_dir=run_dir)


def test_training_writes_best_last_per_epoch_and_final_checkpoints(trained) -> None:
    names = {p.name for p in (trained.run_dir / "checkpoints").glob("*.ckpt")}
    assert {"best.ckpt", "last.ckpt", "epoch000.ckpt", "epoch001.ckpt", "final.ckpt"} <= names


def test_final_checkpoint_carries_the_measured_scale_factor(trained) -> None:
    state = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    scale = state["state_dict"]["latent_scale_factor"].item()
    assert scale == pytest.approx(trained.latent_stats["scale_factor"], rel=1e-6)
    assert scale == pytest.approx(1 / trained.latent_stats["global_std"], rel=1e-6)
    assert scale != pytest.approx(0.18215)


def test_export_reproduces_the_checkpointed_model_exactly(trained) -> None:
    state = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    module = VAEModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    vae, metadata = load_vae_export(trained.export_dir)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        module.eval()
        assert torch.equal(vae.encode(images).mean, module.vae.encode(images).mean)
        z = torch.randn(2, 4, 8, 8)
        assert torch.equal(vae.decode(z), module.vae.decode(z))
    assert metadata["latent_stats"]["scale_factor"] == trained.latent_stats["scale_factor"]
    assert metadata["extra"]["image_size"] == 32


def test_latest_link_points_at_the_finished_run(trained) -> None:
    latest = trained.run_dir.parent / "latest"
    assert latest.is_symlink() and latest.resolve() == trained.run_dir.resolve()


def test_validation_image_grids_are_saved(trained) -> None:
    assert list((trained.run_dir / "images").glob("inputs_reconstructions_step*.png"))


def test_wandb_offline_run_records_scalars_and_the_image_grid(trained) -> None:
    runs = list((trained.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (
        b"train/recon",
        b"train/kl",
        b"train/total",
        b"val/recon",
        b"val/psnr",
        b"val/ssim",
        b"train/latent_std_c0",
        b"val/latent_mean_c3",
        b"lr-AdamW",
        b"perf/samples_per_second",
        b"perf/first_step_seconds",
        b"latent/scale_factor",
        b"val/images",
    ):
        assert key in records, key
    assert list(runs[0].glob("files/media/images/val/images_*.png"))


def test_measure_only_mode_exports_an_existing_checkpoint(
    trained, synthetic_overrides, tmp_path
) -> None:
    best = trained.run_dir / "checkpoints" / "best.ckpt"
    cfg = tiny_cfg(synthetic_overrides, "train=false", f"ckpt_path={best}", "logger=none")
    result = run_vae_stage(cfg, run_dir=tmp_path / "measure")
    assert (result.export_dir / "vae.safetensors").is_file()
    assert result.latent_stats["num_latents"] == 8  # latent_stats.max_batches=2 batches of 4


def test_measure_only_without_a_checkpoint_says_what_to_pass(synthetic_overrides, tmp_path) -> None:
    cfg = tiny_cfg(synthetic_overrides, "train=false", "logger=none")
    with pytest.raises(ValueError, match="ckpt_path="):
        run_vae_stage(cfg, run_dir=tmp_path / "run")


def test_a_run_resumed_mid_epoch_repeats_the_uninterrupted_one_exactly(
    synthetic_overrides, tmp_path, monkeypatch
) -> None:
    import ldm.training.vae_stage as stage

    common = [
        *synthetic_overrides,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=1",
        "logger=none",
        "trainer.checkpoint_every_n_steps=3",
        "optim.lr_warmup_steps=2",
        "optim.lr_schedule=cosine",
    ]
    runs = run_whole_interrupted_and_resumed(
        stage,
        lambda cfg, run_dir: run_vae_stage(cfg, run_dir=run_dir),
        lambda *extra: tiny_cfg(common, *extra),
        tmp_path,
        monkeypatch,
        stop_after_steps=3,
    )
    assert len(runs.whole) == 6 and len(runs.first) == 3
    assert runs.first + runs.resumed == runs.whole
    whole = torch.load(runs.whole_dir / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(runs.resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert whole["global_step"] == resumed["global_step"] == 6  # last.ckpt is the final state
    for name, tensor in whole["state_dict"].items():  # bit for bit (NaN: not yet measured)
        torch.testing.assert_close(
            resumed["state_dict"][name], tensor, rtol=0, atol=0, equal_nan=True, msg=name
        )
