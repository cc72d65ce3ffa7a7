"""Specification of the exports (safetensors + JSON, exact round trip, no pickle) and of the
U-Net export every training checkpoint carries."""

import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

import ldm.exports
from ldm.exports import (
    file_fingerprint,
    load_unet_export,
    load_unet_for_sampling,
    load_vae_export,
    save_unet_export,
    save_vae_export,
)
from ldm.models import VAE, VAEConfig
from ldm.training.diffusion_module import LatentDiffusionModule

TINY = VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4)
STATS = {
    "channel_mean": [0.1, -0.2, 0.3, 0.0],
    "channel_std": [1.5, 2.0, 2.5, 1.0],
    "global_mean": 0.05,
    "global_std": 2.0,
    "scale_factor": 0.5,
    "num_latents": 8,
    "sampled_posterior": True,
}


@pytest.fixture
def vae() -> VAE:
    torch.manual_seed(0)
    return VAE(TINY).eval()


@pytest.fixture
def export_dir(tmp_path: Path, vae: VAE) -> Path:
    return save_vae_export(tmp_path / "export", vae, latent_stats=STATS, extra={"step": 123})


def _rewrite_json(export_dir: Path, **changes: object) -> None:
    path = export_dir / "vae.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_round_trip_reproduces_encoder_and_decoder_outputs_exactly(
    export_dir: Path, vae: VAE
) -> None:
    loaded, _ = load_vae_export(export_dir)
    images, latents = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images).mean, vae.encode(images).mean)
        assert torch.equal(loaded.decode(latents), vae.decode(latents))


def test_loaded_model_has_the_saved_config_and_is_in_eval_mode(export_dir: Path) -> None:
    loaded, _ = load_vae_export(export_dir)
    assert loaded.config == TINY
    assert not loaded.training


def test_json_records_format_type_config_stats_fingerprint_and_extra(export_dir: Path) -> None:
    _, metadata = load_vae_export(export_dir)
    assert metadata["format_version"] == 1
    assert metadata["model_type"] == "vae"
    assert VAEConfig.from_dict(metadata["model_config"]) == TINY
    assert metadata["latent_stats"] == STATS
    assert metadata["weights_sha256"] == file_fingerprint(export_dir / "vae.safetensors")
    assert metadata["extra"] == {"step": 123}


def test_json_path_loads_like_its_directory(export_dir: Path, vae: VAE) -> None:
    loaded, _ = load_vae_export(export_dir / "vae.json")
    assert all(
        torch.equal(loaded.state_dict()[name], tensor) for name, tensor in vae.state_dict().items()
    )


def test_export_holds_only_the_json_and_safetensors_files(export_dir: Path) -> None:
    assert sorted(path.name for path in export_dir.iterdir()) == ["vae.json", "vae.safetensors"]


def test_loading_never_unpickles(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading a VAE export must not unpickle")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    loaded, _ = load_vae_export(export_dir)
    assert isinstance(loaded, VAE)


def test_missing_export_names_the_path_and_says_how_to_make_one(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-export"
    with pytest.raises(FileNotFoundError, match=r"no-such-export.*python train_vae\.py"):
        load_vae_export(missing)


def test_missing_weights_file_is_reported_by_name(export_dir: Path) -> None:
    (export_dir / "vae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"vae\.safetensors does not exist"):
        load_vae_export(export_dir)


def test_json_describing_another_model_type_is_refused(export_dir: Path) -> None:
    _rewrite_json(export_dir, model_type="unet")
    with pytest.raises(ValueError, match=r"model_type 'unet', not 'vae'"):
        load_vae_export(export_dir)


def test_unsupported_format_version_is_refused(export_dir: Path) -> None:
    _rewrite_json(export_dir, format_version=99)
    with pytest.raises(ValueError, match=r"format version 99.*Re-export"):
        load_vae_export(export_dir)


def test_weights_that_do_not_fit_the_config_are_refused(export_dir: Path) -> None:
    _rewrite_json(export_dir, model_config={**TINY.to_dict(), "block_channels": [8, 8, 16]})
    with pytest.raises(ValueError, match="do not fit the model config"):
        load_vae_export(export_dir)


def test_weights_replaced_after_export_are_caught_by_the_fingerprint(
    tmp_path: Path, export_dir: Path
) -> None:
    other = save_vae_export(tmp_path / "other", VAE(TINY), latent_stats=STATS)
    (other / "vae.safetensors").replace(export_dir / "vae.safetensors")
    with pytest.raises(ValueError, match="incomplete or was modified"):
        load_vae_export(export_dir)


def test_failed_save_leaves_the_previous_export_intact(
    export_dir: Path, vae: VAE, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(tensors: object, filename: str) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ldm.exports, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_vae_export(export_dir, VAE(TINY), latent_stats=STATS)
    monkeypatch.undo()

    loaded, _ = load_vae_export(export_dir)
    assert torch.equal(loaded.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    assert sorted(path.name for path in export_dir.iterdir()) == ["vae.json", "vae.safetensors"]


def test_save_refuses_latent_stats_without_the_scale_factor(tmp_path: Path, vae: VAE) -> None:
    incomplete = {key: value for key, value in STATS.items() if key != "scale_factor"}
    with pytest.raises(ValueError, match=r"lacks \['scale_factor'\]"):
        save_vae_export(tmp_path, vae, latent_stats=incomplete)


def test_save_refuses_extra_that_is_not_plain_json(tmp_path: Path, vae: VAE) -> None:
    with pytest.raises(ValueError, match="not plain JSON"):
        save_vae_export(tmp_path, vae, latent_stats=STATS, extra={"lr": torch.tensor(1e-4)})
    assert list(tmp_path.iterdir()) == []


def test_file_fingerprint_is_the_sha256_of_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"latent diffusion")
    assert file_fingerprint(path) == hashlib.sha256(b"latent diffusion").hexdigest()


# ---- the U-Net export, in a folder and in a training checkpoint ---------------------------------


@pytest.fixture
def module() -> LatentDiffusionModule:
    """A training module whose raw and EMA weights differ, recording what sampling needs."""
    torch.manual_seed(0)
    module = LatentDiffusionModule(
        unet={
            "model_channels": 16,
            "channel_multipliers": [1, 2],
            "transformer_levels": [1],
            "norm_groups": 8,
            "attention_head_dim": 16,
            "context_dim": 32,
        },
        diffusion={"num_train_timesteps": 50},
        optim={},
        ema={},
        cond_dropout=0.1,
        latent_norm={"kind": "global", "scale_factor": 0.5},
        latent_shape=[4, 8, 8],
        context_length=8,
        validation={"timestep_buckets": 2, "sampling": {"steps": 10}},
        provenance={
            "vae_export": "/runs/vae/run1/export",
            "vae_weights_sha256": "0" * 64,
            "text_encoder": {"model_name": "ViT-B-32"},
            "image_size": 16,
        },
    )
    with torch.no_grad():
        for parameter in module.ema.module.parameters():
            parameter.add_(1.0)
    return module


def lightning_checkpoint(module: LatentDiffusionModule) -> dict:
    """What Lightning hands ``on_save_checkpoint`` (and then torch.saves): the module's state."""
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def saved_size(checkpoint: dict) -> int:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getbuffer().nbytes


def test_checkpoint_carries_its_export_without_storing_the_weights_twice(module) -> None:
    """The export's state dicts share their tensors with the checkpoint's state_dict, and
    torch.save writes a shared storage once: measured here, the export adds only its keys and
    metadata (a copy of the weights would add 100% of them)."""
    checkpoint = lightning_checkpoint(module)
    without_export = {key: value for key, value in checkpoint.items() if key != "export"}
    weights = sum(
        tensor.numel() * tensor.element_size()
        for state_dict in checkpoint["export"]["weights"].values()
        for tensor in state_dict.values()
    )
    grown = saved_size(checkpoint) - saved_size(without_export)
    assert grown < 0.1 * weights


def test_checkpoint_and_export_folder_give_the_same_unet_and_metadata(module, tmp_path) -> None:
    folder = save_unet_export(tmp_path / "export", module.export())
    ckpt = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(module), ckpt)
    for weights, expected in (("raw", module.unet), ("ema", module.ema.module)):
        from_folder = load_unet_for_sampling(folder, weights)
        from_ckpt = load_unet_for_sampling(ckpt, weights)
        for name, tensor in expected.state_dict().items():
            assert torch.equal(from_folder.unet.state_dict()[name], tensor)
            assert torch.equal(from_ckpt.unet.state_dict()[name], tensor)
        assert from_ckpt.diffusion == from_folder.diffusion == {"num_train_timesteps": 50}
        assert from_ckpt.vae_export == from_folder.vae_export == Path("/runs/vae/run1/export")
    in_folder = json.loads((folder / "unet.json").read_text())
    in_ckpt = torch.load(ckpt, weights_only=True)["export"]["metadata"]
    del in_folder["weights_sha256"]  # the files' fingerprints, which only the folder has
    assert json.loads(json.dumps(in_ckpt)) == in_folder


def test_checkpoint_without_an_export_is_refused_saying_how_to_get_one(module, tmp_path) -> None:
    checkpoint = lightning_checkpoint(module)
    del checkpoint["export"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    with pytest.raises(ValueError, match=r"before checkpoints carried their export.*resume it"):
        load_unet_for_sampling(old)


def test_unet_weights_replaced_after_export_are_caught_by_the_fingerprint(module, tmp_path) -> None:
    folder = save_unet_export(tmp_path / "export", module.export())
    (folder / "unet.safetensors").replace(folder / "unet_ema.safetensors")
    with pytest.raises(ValueError, match="incomplete or was modified"):
        load_unet_export(folder, weights="ema")
