"""Specification of the VAE export: safetensors + JSON, exact round trip, no pickle."""

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

import ldm.exports
from ldm.exports import file_fingerprint, load_vae_export, save_vae_export
from ldm.models import VAE, VAEConfig

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
