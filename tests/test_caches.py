"""Specification of the stage-2 caches (VAE posteriors, caption hidden states) and their loaders."""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import test_unet_training
import torch
from helpers import CONF_DIR, SMALL_SYNTHETIC, TINY_CLIP, TINY_CLIP_CONFIG, compose_config
from omegaconf import OmegaConf

from ldm.caches.__main__ import main as cache_command
from ldm.caches.datamodule import LatentDataModule
from ldm.data.array_store import CacheConfig, CacheMismatchError, building_cache, read_metadata
from ldm.data.batch_randomness import StepRandomness
from ldm.data.config import DataConfig
from ldm.data.datamodule import LoaderSettings
from ldm.data.dataset import CaptionedImageDataset
from ldm.exports import load_vae_export, save_vae_export
from ldm.models import VAE, VAEConfig
from ldm.text import FrozenTextEncoder, TextEncoderConfig
from ldm.training.unet_stage import run_unet_stage

vae_export = test_unet_training.vae_export  # the stage-2 tests' tiny VAE export (a fixture)

TINY_VAE = VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4)
IMAGE_SIZE_PX = 32  # latents (4, 16, 16) with the two-level VAE
BATCH_SIZE = 8
STATS = {
    "channel_mean": [0.0] * 4,
    "channel_std": [1.0] * 4,
    "global_mean": 0.0,
    "global_std": 2.0,
    "scale_factor": 0.5,
    "num_latents": 1,
    "sampled_posterior": True,
}


def tiny_text_encoder(seed: int = 0) -> TextEncoderConfig:
    return TextEncoderConfig(model_name=TINY_CLIP, pretrained=None, seed=seed)


def export_vae(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_vae_export(directory, VAE(TINY_VAE).eval(), latent_stats=STATS)


def data_config(root: Path, **settings: object) -> DataConfig:
    return DataConfig.from_dict(
        {
            "source": "synthetic",
            "root": str(root),
            "train": {
                "annotations": str(root / "annotations" / "captions_train2017.json"),
                "images": str(root / "train2017"),
            },
            "val": {
                "annotations": str(root / "annotations" / "captions_val2017.json"),
                "images": str(root / "val2017"),
            },
            "image_size": IMAGE_SIZE_PX,
            "batch_size": BATCH_SIZE,
            "synthetic": vars(SMALL_SYNTHETIC),
            **settings,
        }
    )


def make_datamodule(
    root: Path,
    work: Path,
    *,
    text_encoder: TextEncoderConfig | None = None,
    data: dict[str, object] | None = None,
    **cache_settings: object,
) -> LatentDataModule:
    cache = CacheConfig(**{"dir": work / "latents", "batch_size": 16, **cache_settings})
    return LatentDataModule(
        data_config(root, **(data or {})),
        LoaderSettings(),
        seed=5,
        cache_dir=work / "checks",
        cache=cache,
        vae_export=work / "vae",
        text_encoder=text_encoder or tiny_text_encoder(),
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("latent-cache")
    export_vae(work / "vae", seed=0)
    return work


@pytest.fixture(scope="module")
def prepared(synthetic_root: Path, work: Path) -> LatentDataModule:
    """One cache built once and only read by the tests that use it."""
    datamodule = make_datamodule(synthetic_root, work)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


@pytest.fixture
def fresh_work(tmp_path: Path) -> Path:
    export_vae(tmp_path / "vae", seed=0)
    return tmp_path


def assert_equal_in_float16(cached: np.ndarray, direct: torch.Tensor) -> None:
    """Equal up to float16 storage and the last bits a different batch size can change."""
    np.testing.assert_allclose(cached.astype(np.float32), direct.numpy(), rtol=1e-3, atol=1e-6)


# ---- round trip ------------------------------------------------------------------------


def test_cached_posteriors_equal_direct_encoding_of_each_image_and_its_mirror(
    prepared: LatentDataModule,
) -> None:
    vae, _ = load_vae_export(prepared.vae_export)
    latents = prepared.latents["train"]
    records = prepared.images.train_records
    images = CaptionedImageDataset(records, IMAGE_SIZE_PX, train=False)
    for index in (0, len(records) - 1):
        image = images[index]["image"][None]  # (1, 3, S, S)
        with torch.no_grad():
            plain = vae.encode(image)
            mirrored = vae.encode(image.flip(-1))
        assert_equal_in_float16(latents.mean[index, 0], plain.mean[0])
        assert_equal_in_float16(latents.std[index, 0], plain.std[0])
        assert_equal_in_float16(latents.mean[index, 1], mirrored.mean[0])
        assert_equal_in_float16(latents.std[index, 1], mirrored.std[0])
    assert latents.image_ids.tolist() == [r.image_id for r in records]
    assert latents.captions == [list(r.captions) for r in records]


def test_validation_latents_hold_only_the_unflipped_encoding(prepared: LatentDataModule) -> None:
    assert prepared.latents["train"].mean.shape[1:] == (2, 4, 16, 16)
    assert prepared.latents["val"].mean.shape[1:] == (1, 4, 16, 16)


def test_cached_caption_states_equal_direct_text_encoding(prepared: LatentDataModule) -> None:
    encoder = FrozenTextEncoder(tiny_text_encoder())
    captions = prepared.captions.split("val")
    record = prepared.images.val_records[3]
    positions = prepared.text_num_positions
    expected = encoder.encode_hidden_states(list(record.captions), positions).half().numpy()
    found = np.stack([captions.hidden_states_for(3, j) for j in range(len(record.captions))])
    np.testing.assert_allclose(found, expected, rtol=0, atol=2e-3)


def test_caption_cache_keeps_positions_up_to_the_longest_caption(
    prepared: LatentDataModule,
) -> None:
    encoder = FrozenTextEncoder(tiny_text_encoder())
    records = prepared.images.train_records + prepared.images.val_records
    longest = max(encoder.token_count(c) for r in records for c in r.captions)
    assert longest < 32  # the cap (cache.text_max_positions) does not bite on this data
    assert prepared.text_num_positions == longest
    assert prepared.captions.metadata["num_positions"] == longest


def test_caption_positions_are_capped_and_cut_captions_counted(
    synthetic_root: Path, fresh_work: Path
) -> None:
    datamodule = make_datamodule(synthetic_root, fresh_work, text_max_positions=6)
    datamodule.prepare_data()
    datamodule.setup()
    assert datamodule.text_num_positions == 6
    assert datamodule.captions.metadata["truncated_captions"] > 0


def test_identical_captions_are_stored_once(prepared: LatentDataModule) -> None:
    records = prepared.images.train_records + prepared.images.val_records
    distinct = {caption for record in records for caption in record.captions}
    assert prepared.captions.hidden_states.shape[0] == len(distinct)


def test_cache_arrays_open_as_read_only_memory_maps(prepared: LatentDataModule) -> None:
    arrays = [
        prepared.latents["train"].mean,
        prepared.latents["train"].std,
        prepared.captions.hidden_states,
        prepared.captions.split("train").caption_rows,
    ]
    assert all(isinstance(array, np.memmap) and not array.flags.writeable for array in arrays)
    assert prepared.latents["train"].mean.dtype == np.float16
    assert prepared.captions.hidden_states.dtype == np.float16


def test_metadata_records_fingerprint_data_config_and_count(
    prepared: LatentDataModule,
) -> None:
    metadata = prepared.latents["train"].metadata
    assert metadata["key"]["vae_weights_sha256"] == prepared.vae_metadata["weights_sha256"]
    assert metadata["key"]["data"]["image_size"] == IMAGE_SIZE_PX
    assert metadata["key"]["data"]["split"] == "train"
    assert metadata["count"] == len(prepared.images.train_records)
    assert metadata["format_version"] == 1


# ---- invalidation -------------------------------------------------------------------------


def test_a_current_cache_is_reused_without_decoding_or_encoding_any_image(
    synthetic_root: Path, work: Path, prepared: LatentDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a current cache must be reused as it is")

    monkeypatch.setattr("ldm.data.coco_index.read_rgb_image", refuse)
    monkeypatch.setattr(VAE, "encode", refuse)
    monkeypatch.setattr(FrozenTextEncoder, "encode_hidden_states", refuse)
    again = make_datamodule(synthetic_root, work)
    again.prepare_data()
    again.setup()
    assert again.latents["train"].folder == prepared.latents["train"].folder


def test_a_changed_vae_rebuilds_the_latents_and_keeps_the_caption_cache(
    synthetic_root: Path, fresh_work: Path
) -> None:
    first = make_datamodule(synthetic_root, fresh_work)
    first.prepare_data()
    first.setup()
    captions_written = (first.captions.folder / "cache.json").stat().st_mtime_ns
    old_sha = first.latents["train"].metadata["key"]["vae_weights_sha256"]

    export_vae(fresh_work / "vae", seed=1)
    second = make_datamodule(synthetic_root, fresh_work)
    second.prepare_data()
    second.setup()

    assert second.latents["train"].metadata["key"]["vae_weights_sha256"] != old_sha
    assert second.captions.folder == first.captions.folder
    assert (first.captions.folder / "cache.json").stat().st_mtime_ns == captions_written


def test_a_changed_vae_under_policy_error_is_refused_naming_what_differs(
    synthetic_root: Path, fresh_work: Path
) -> None:
    make_datamodule(synthetic_root, fresh_work).prepare_data()
    export_vae(fresh_work / "vae", seed=1)
    refusing = make_datamodule(synthetic_root, fresh_work, policy="error")
    with pytest.raises(CacheMismatchError, match=r"vae_weights_sha256: '[0-9a-f]{64}' → '[0-9a-f]"):
        refusing.prepare_data()


def test_a_changed_text_encoder_under_policy_error_is_refused_naming_what_differs(
    synthetic_root: Path, fresh_work: Path
) -> None:
    make_datamodule(synthetic_root, fresh_work).prepare_data()
    reseeded = tiny_text_encoder(seed=1)
    refusing = make_datamodule(synthetic_root, fresh_work, policy="error", text_encoder=reseeded)
    with pytest.raises(CacheMismatchError, match=r"text_encoder\.weights: .*seed=0.* → .*seed=1"):
        refusing.prepare_data()


def count_encoded_images(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of every VAE encoding from now on."""
    calls: list[int] = []
    original_encode = VAE.encode

    def counting_encode(self: VAE, images: torch.Tensor):
        calls.append(int(images.shape[0]))
        return original_encode(self, images)

    monkeypatch.setattr(VAE, "encode", counting_encode)
    return calls


def test_replacing_an_image_file_rebuilds_the_latents_from_its_new_content(
    synthetic_root: Path, fresh_work: Path
) -> None:
    root = Path(shutil.copytree(synthetic_root, fresh_work / "synthetic"))
    first = make_datamodule(root, fresh_work)
    first.prepare_data()
    first.setup()
    replaced, donor = first.images.train_records[:2]
    shutil.copyfile(donor.path, replaced.path)  # another picture under the same name
    later = replaced.path.stat().st_mtime_ns + 10**9  # and surely a new mtime, on any filesystem
    os.utime(replaced.path, ns=(later, later))

    second = make_datamodule(root, fresh_work)
    second.prepare_data()
    second.setup()

    assert second.latents["train"].folder != first.latents["train"].folder
    donor_latents = torch.from_numpy(first.latents["train"].mean[1].astype(np.float32))
    assert_equal_in_float16(second.latents["train"].mean[0], donor_latents)
    assert second.captions.folder == first.captions.folder  # captions do not depend on pixels


def test_switching_the_subset_back_reuses_its_cache_without_encoding_again(
    synthetic_root: Path, fresh_work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def prepared_with_subset(subset: int) -> LatentDataModule:
        datamodule = make_datamodule(synthetic_root, fresh_work, data={"subset": subset})
        datamodule.prepare_data()
        datamodule.setup()
        return datamodule

    first = prepared_with_subset(24)
    written = (first.latents["train"].folder / "cache.json").stat().st_mtime_ns
    other = prepared_with_subset(16)
    encoded = count_encoded_images(monkeypatch)
    again = prepared_with_subset(24)

    assert encoded == []
    assert other.latents["train"].folder != first.latents["train"].folder
    assert again.latents["train"].folder == first.latents["train"].folder
    assert again.captions.folder == first.captions.folder
    assert (again.latents["train"].folder / "cache.json").stat().st_mtime_ns == written


def test_setup_without_prepare_data_says_how_to_build_the_cache(
    synthetic_root: Path, fresh_work: Path
) -> None:
    with pytest.raises(FileNotFoundError, match=r"Call prepare_data\(\) first"):
        make_datamodule(synthetic_root, fresh_work).setup()


def test_an_interrupted_build_leaves_no_cache_that_looks_complete(
    synthetic_root: Path, fresh_work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original_encode = VAE.encode

    def encode_failing_on_the_second_batch(self: VAE, images: torch.Tensor):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original_encode(self, images)

    monkeypatch.setattr(VAE, "encode", encode_failing_on_the_second_batch)
    datamodule = make_datamodule(synthetic_root, fresh_work)
    with pytest.raises(KeyboardInterrupt):
        datamodule.prepare_data()

    assert list(datamodule.folder.iterdir()) == []  # no cache, and no staging folder either
    with pytest.raises(FileNotFoundError):
        datamodule.setup()


def test_a_failed_rebuild_keeps_the_previous_cache(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    with building_cache(folder) as writer:
        writer.new_array("values.npy", (2,), np.float16)[:] = [1, 2]
        writer.finish("test", {"version": 1}, {})
    with pytest.raises(RuntimeError), building_cache(folder) as writer:
        writer.new_array("values.npy", (2,), np.float16)[:] = [3, 4]
        raise RuntimeError("killed midway")
    assert read_metadata(folder)["key"] == {"version": 1}
    assert np.load(folder / "values.npy").tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# ---- loaders ------------------------------------------------------------------------------


def test_train_loader_yields_the_documented_batch(prepared: LatentDataModule) -> None:
    batch = next(iter(prepared.train_dataloader()))
    positions, width = prepared.text_num_positions, TINY_CLIP_CONFIG["text_cfg"]["width"]
    assert batch["latent_mean"].shape == (BATCH_SIZE, 4, 16, 16)
    assert batch["latent_std"].shape == (BATCH_SIZE, 4, 16, 16)
    assert batch["text_hidden_states"].shape == (BATCH_SIZE, positions, width)
    # float16 until the training step: half the bytes through the loader and the copy
    assert {batch[k].dtype for k in ("latent_mean", "latent_std", "text_hidden_states")} == {
        torch.float16
    }
    for key in ("index", "variant", "caption_row", "image_id"):
        assert batch[key].shape == (BATCH_SIZE,) and batch[key].dtype == torch.int64
    assert "caption" not in batch  # strings only where grids need them (validation)


def test_training_batches_carry_the_step_randomness_the_module_asks_for(
    prepared: LatentDataModule,
) -> None:
    prepared.train_randomness = StepRandomness(
        posterior_noise_shape=(4, 16, 16),
        num_timesteps=200,
        diffusion_noise_shape=(4, 16, 16),
        cond_dropout=0.5,
    )
    try:
        first, second = list(prepared.train_dataloader())[:2]
        again = next(iter(prepared.train_dataloader()))
    finally:
        prepared.train_randomness = StepRandomness()
    assert (
        first["posterior_noise"].shape == first["diffusion_noise"].shape == (BATCH_SIZE, 4, 16, 16)
    )
    assert first["timesteps"].dtype == torch.int64 and first["drop_condition"].dtype == torch.bool
    assert torch.equal(first["diffusion_noise"], again["diffusion_noise"])  # keyed, not global
    assert not torch.equal(first["diffusion_noise"], second["diffusion_noise"])


def test_train_items_pick_the_caption_and_flip_the_image_dataset_would_pick(
    prepared: LatentDataModule,
) -> None:
    dataset = prepared.train_dataloader().dataset
    images = CaptionedImageDataset(prepared.images.train_records, IMAGE_SIZE_PX, train=True)
    unflipped = CaptionedImageDataset(prepared.images.train_records, IMAGE_SIZE_PX, train=False)
    latents = prepared.latents["train"]
    flips_seen = set()
    for seed in range(8):
        item, image = dataset[(2, seed)], images[(2, seed)]
        image_flipped = not torch.equal(image["image"], unflipped[2]["image"])
        assert bool(item["variant"]) == image_flipped
        flips_seen.add(image_flipped)
        caption_index = latents.captions[2].index(image["caption"])
        expected = prepared.captions.split("train").hidden_states_for(2, caption_index)
        np.testing.assert_array_equal(item["text_hidden_states"].numpy(), expected)
        np.testing.assert_array_equal(
            item["latent_mean"].numpy(), latents.mean[2, int(image_flipped)]
        )
    assert flips_seen == {True, False}


def test_the_same_item_seed_gives_the_same_item(prepared: LatentDataModule) -> None:
    dataset = prepared.train_dataloader().dataset
    first, second = dataset[(4, 1234)], dataset[(4, 1234)]
    assert first["caption_row"] == second["caption_row"]
    assert torch.equal(first["latent_mean"], second["latent_mean"])


def test_a_restored_data_module_continues_with_the_same_batches(
    prepared: LatentDataModule,
) -> None:
    batches = iter(prepared.train_dataloader())
    next(batches)
    state = prepared.state_dict()
    expected = next(batches)

    prepared.load_state_dict(state)
    found = next(iter(prepared.train_dataloader()))
    assert torch.equal(found["index"], expected["index"])
    assert torch.equal(found["caption_row"], expected["caption_row"])
    assert torch.equal(found["latent_mean"], expected["latent_mean"])


def test_datasets_pickle_as_folder_references_not_array_copies(
    prepared: LatentDataModule,
) -> None:
    """Spawned DataLoader workers (macOS) must reopen the memory maps, not receive copies."""
    dataset = prepared.train_dataloader().dataset
    payload = pickle.dumps(dataset)
    assert len(payload) < 4096 < prepared.latents["train"].mean.nbytes
    restored = pickle.loads(payload)
    assert restored[(3, 99)]["caption_row"] == dataset[(3, 99)]["caption_row"]
    assert isinstance(restored.latents.mean, np.memmap)


def test_batches_gathered_on_the_device_equal_those_gathered_on_the_host(
    prepared: LatentDataModule,
) -> None:
    """The cache.device=cuda path, run with the CPU standing in for the GPU: the loader sends
    only indices and on_after_batch_transfer gathers from resident copies, bit for bit as the
    host gather does."""
    host_batch = next(iter(prepared.train_dataloader()))
    prepared.__dict__["resident_device"] = torch.device("cpu")
    try:
        index_batch = next(iter(prepared.train_dataloader()))
        assert "latent_mean" not in index_batch
        gathered = prepared.on_after_batch_transfer(index_batch, 0)
    finally:
        del prepared.__dict__["resident_device"]
        prepared._resident.clear()
    for key in ("latent_mean", "latent_std", "text_hidden_states"):
        assert torch.equal(gathered[key], host_batch[key]), key


def test_val_loader_gives_first_captions_unflipped_in_order(prepared: LatentDataModule) -> None:
    batch = next(iter(prepared.val_dataloader()))
    records = prepared.images.val_records[:BATCH_SIZE]
    assert batch["caption"] == [record.captions[0] for record in records]
    assert batch["image_id"].tolist() == [record.image_id for record in records]
    expected = torch.from_numpy(prepared.latents["val"].mean[:BATCH_SIZE, 0].astype(np.float32))
    assert torch.equal(batch["latent_mean"], expected)


def test_empty_prompt_states_match_the_encoder_cut_to_the_cached_length(
    prepared: LatentDataModule,
) -> None:
    positions = prepared.text_num_positions
    expected = FrozenTextEncoder(tiny_text_encoder()).encode_hidden_states([""], positions)
    found = prepared.empty_prompt_hidden_states()
    assert found.shape == (1, positions, TINY_CLIP_CONFIG["text_cfg"]["width"])
    torch.testing.assert_close(found, expected, rtol=0, atol=2e-3)


def test_cache_config_file_is_valid_and_points_into_the_cache_dir() -> None:
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "cache" / "default.yaml"))
    assert raw["dir"] == "${paths.cache_dir}/latents"
    config = CacheConfig.from_dict({**raw, "dir": "/tmp/latents"})
    assert (config.policy, config.text_max_positions) == ("rebuild", 32)


def test_unknown_cache_policy_is_refused() -> None:
    with pytest.raises(ValueError, match=r"cache\.policy must be one of"):
        CacheConfig(dir=Path("/tmp"), policy="sometimes")


# ---- the cache command -------------------------------------------------------------------


def test_the_cache_command_builds_the_caches_a_following_training_run_finds_current(
    synthetic_overrides: list[str],
    vae_export: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overrides = [*test_unet_training.TINY, *synthetic_overrides, f"vae_export={vae_export}"]
    hydra_quiet = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
    command_line = [*overrides, f"hydra.run.dir={tmp_path / 'caching'}", *hydra_quiet]
    monkeypatch.setattr(sys, "argv", ["python -m ldm.caches", *command_line])
    cache_command()
    printed = capsys.readouterr().out.splitlines()
    folders = [Path(line.split(": ", 1)[1]) for line in printed[1:]]
    assert [line.split(":")[0].strip() for line in printed[1:]] == [
        "train latents",
        "val latents",
        "captions",
    ]
    assert all((folder / "cache.json").is_file() for folder in folders)

    def rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the training run rebuilt a cache the command had built")

    monkeypatch.setattr(LatentDataModule, "_build_latents", rebuild)
    monkeypatch.setattr(LatentDataModule, "_build_captions", rebuild)
    cfg = compose_config("train_unet", [*overrides, "trainer.fast_dev_run=true", "logger=none"])
    run_unet_stage(cfg, run_dir=tmp_path / "run")
