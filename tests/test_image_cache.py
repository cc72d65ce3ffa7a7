"""Specification of the decoded-image cache: same batches as decoding, rebuilt when stale."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import TINY_VAE_RUN, compose_config, synthetic_data_config

from ldm.data.array_store import cache_is_current
from ldm.data.batch_randomness import StepRandomness
from ldm.data.coco_index import CaptionedImage, build_caption_index
from ldm.data.datamodule import CaptionedImageDataModule, LoaderSettings
from ldm.data.dataset import CaptionedImageDataset
from ldm.data.image_cache import (
    DECODED_IMAGES_KIND,
    CachedImageDataset,
    ImageCache,
    ensure_image_cache,
    image_cache_enabled,
    image_cache_key,
)
from ldm.data.transforms import to_model_range
from ldm.training.vae_stage import run_vae_stage

IMAGE_SIZE_PX = 64
RANDOMNESS = StepRandomness(posterior_noise_shape=(4, 8, 8))


@pytest.fixture(scope="module")
def coco_cache(coco_records, tmp_path_factory) -> ImageCache:
    """The real COCO sample's photos (of many sizes and aspect ratios), cached once."""
    return ensure_image_cache(
        tmp_path_factory.mktemp("images") / "sample",
        coco_records,
        image_size_px=IMAGE_SIZE_PX,
        batch_size=16,
    )


@pytest.fixture
def copied_records(synthetic_root: Path, tmp_path: Path) -> list[CaptionedImage]:
    """Six synthetic images copied where a test may replace them."""
    records, _ = build_caption_index(
        synthetic_root / "annotations" / "captions_val2017.json",
        synthetic_root / "val2017",
        verify_images=False,
    )
    folder = tmp_path / "images"
    folder.mkdir()
    copies = []
    for record in records[:6]:
        shutil.copy2(record.path, folder / record.path.name)
        copies.append(replace(record, path=folder / record.path.name))
    return copies


def shuffled_training_keys(size: int, count: int, seed: int) -> list[tuple[int, int]]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(size, generator=generator)[:count].tolist()
    return [(index, 1_000 + seed * count + n) for n, index in enumerate(order)]


# ---- same numbers as decoding --------------------------------------------------------------


def test_to_model_range_maps_uint8_linearly_onto_minus_one_to_one_and_passes_floats() -> None:
    pixels = torch.arange(256, dtype=torch.uint8)
    converted = to_model_range(pixels)
    assert converted.dtype == torch.float32
    assert converted[0] == -1 and converted[255] == 1
    exact = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    assert (converted.double() - exact).abs().max() < 1e-7
    floats = torch.rand(2, 3, 4, 4) * 2 - 1
    assert to_model_range(floats) is floats


def test_cached_training_batches_equal_the_decoding_path_for_the_same_keys(
    coco_records, coco_cache
) -> None:
    decoding = CaptionedImageDataset(coco_records, IMAGE_SIZE_PX, train=True, randomness=RANDOMNESS)
    cached = CachedImageDataset(coco_cache, coco_records, train=True, randomness=RANDOMNESS)
    flipped = 0
    for seed in range(3):
        keys = shuffled_training_keys(len(coco_records), 16, seed)
        expected, batch = decoding.__getitems__(keys), cached.__getitems__(keys)
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (16, 3, 64, 64)
        assert torch.equal(to_model_range(batch["image"]), expected["image"])
        assert torch.equal(batch["image_id"], expected["image_id"])
        assert torch.equal(batch["posterior_noise"], expected["posterior_noise"])
        assert "caption" not in batch  # the VAE reads no text
        rows = torch.tensor([index for index, _ in keys])
        stored = torch.from_numpy(coco_cache.pixels[rows.numpy()])
        flipped += sum(not torch.equal(a, b) for a, b in zip(batch["image"], stored, strict=True))
    assert 0 < flipped < 48  # mirrors were drawn, and matched the decoding path's


def test_cached_evaluation_batches_carry_first_captions_and_equal_the_decoding_path(
    coco_records, coco_cache
) -> None:
    keys = [5, 0, 57, 12, 30]
    expected = CaptionedImageDataset(coco_records, IMAGE_SIZE_PX, train=False).__getitems__(keys)
    batch = CachedImageDataset(coco_cache, coco_records, train=False).__getitems__(keys)
    assert torch.equal(to_model_range(batch["image"]), expected["image"])
    assert batch["caption"] == expected["caption"] == [coco_records[i].captions[0] for i in keys]
    assert torch.equal(batch["image_id"], expected["image_id"])


def test_the_cache_is_one_read_only_uint8_array_in_record_order(coco_records, coco_cache) -> None:
    assert coco_cache.pixels.shape == (58, 3, IMAGE_SIZE_PX, IMAGE_SIZE_PX)
    assert coco_cache.pixels.dtype == "uint8" and not coco_cache.pixels.flags.writeable
    assert coco_cache.image_ids.tolist() == [record.image_id for record in coco_records]


def test_a_cache_of_other_images_is_refused_with_the_fix(coco_records, coco_cache) -> None:
    with pytest.raises(ValueError, match=r"holds other images than this split.*Delete"):
        CachedImageDataset(coco_cache, coco_records[1:], train=True)


# ---- when it is rebuilt ----------------------------------------------------------------------


def test_a_second_build_is_skipped_while_the_cache_is_current(
    copied_records, tmp_path, monkeypatch
) -> None:
    folder = tmp_path / "cache"
    ensure_image_cache(folder, copied_records, image_size_px=32, batch_size=4)
    written = (folder / "cache.json").stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("a current cache was rebuilt")

    monkeypatch.setattr("ldm.data.image_cache.build_image_cache", must_not_build)
    again = ensure_image_cache(folder, copied_records, image_size_px=32, batch_size=4)
    assert len(again) == 6 and (folder / "cache.json").stat().st_mtime_ns == written


def test_a_replaced_image_file_rebuilds_the_cache(copied_records, tmp_path) -> None:
    folder = tmp_path / "cache"
    before = ensure_image_cache(folder, copied_records, image_size_px=32, batch_size=4)
    assert not (before.pixels[2] == before.pixels[3]).all()
    replaced = copied_records[2].path
    shutil.copyfile(copied_records[3].path, replaced)  # same name, other picture
    stat = replaced.stat()
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = ensure_image_cache(folder, copied_records, image_size_px=32, batch_size=4)
    assert (after.pixels[2] == after.pixels[3]).all()


def test_a_different_image_size_rebuilds_the_cache(copied_records, tmp_path, caplog) -> None:
    folder = tmp_path / "cache"
    ensure_image_cache(folder, copied_records, image_size_px=32, batch_size=4)
    resized = ensure_image_cache(folder, copied_records, image_size_px=48, batch_size=4)
    assert resized.pixels.shape == (6, 3, 48, 48)
    assert "image_size: 32 → 48" in caplog.text


def test_an_unreadable_image_stops_the_build_and_leaves_no_cache(copied_records, tmp_path) -> None:
    folder = tmp_path / "cache"
    copied_records[4].path.write_bytes(b"not a jpeg")
    with pytest.raises(RuntimeError, match=r"Could not read 1 image.*data.image_cache=off"):
        ensure_image_cache(folder, copied_records, image_size_px=32, batch_size=4)
    key = image_cache_key(copied_records, 32)
    assert not cache_is_current(folder, DECODED_IMAGES_KIND, key, policy="rebuild")
    assert list(tmp_path.glob("cache*")) == []  # neither the cache nor its staging folder


# ---- configuration -----------------------------------------------------------------------------


def test_image_cache_setting_is_checked_when_the_config_is_parsed(synthetic_root) -> None:
    with pytest.raises(ValueError, match=r"data.image_cache must be one of .*'sometimes'"):
        synthetic_data_config(synthetic_root, image_cache="sometimes")
    # YAML reads a bare on/off as a boolean
    assert synthetic_data_config(synthetic_root, image_cache=True).image_cache == "on"
    assert synthetic_data_config(synthetic_root, image_cache=False).image_cache == "off"


def test_the_real_configs_default_to_auto() -> None:
    assert compose_config("train_vae").data.image_cache == "auto"
    assert compose_config("train_vae", ["data=synthetic"]).data.image_cache == "auto"


def test_auto_caches_images_only_when_training_on_cuda() -> None:
    assert image_cache_enabled("auto", "cuda")
    assert not image_cache_enabled("auto", torch.device("cpu"))
    assert not image_cache_enabled("auto", "mps")
    assert image_cache_enabled("on", "cpu")
    assert not image_cache_enabled("off", "cuda")


# ---- data module and VAE stage --------------------------------------------------------------


def test_datamodule_with_the_cache_on_yields_uint8_batches_equal_to_decoding(
    synthetic_root, tmp_path
) -> None:
    modules = {}
    for choice in ("on", "off"):
        module = CaptionedImageDataModule(
            synthetic_data_config(synthetic_root, image_cache=choice),
            LoaderSettings(),
            seed=0,
            cache_dir=tmp_path,
        )
        module.prepare_data()
        module.setup("fit")
        module.train_randomness = RANDOMNESS
        modules[choice] = module
    assert list((tmp_path / "images").glob("synthetic-*/train-32px/pixels.npy"))
    assert list((tmp_path / "images").glob("synthetic-*/val-32px/pixels.npy"))
    for loader in ("train_dataloader", "val_dataloader", "measurement_dataloader"):
        cached, decoded = (next(iter(getattr(modules[c], loader)())) for c in ("on", "off"))
        assert cached["image"].dtype == torch.uint8, loader
        assert torch.equal(to_model_range(cached["image"]), decoded["image"]), loader
        assert cached.keys() == decoded.keys(), loader


def test_vae_trained_from_the_cache_equals_training_from_decoded_images(
    synthetic_overrides, tmp_path
) -> None:
    results = {}
    for choice in ("on", "off"):
        cfg = compose_config(
            "train_vae",
            [
                *synthetic_overrides,
                *TINY_VAE_RUN,
                "latent_stats.max_batches=2",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
                f"data.image_cache={choice}",
            ],
        )
        results[choice] = run_vae_stage(cfg, run_dir=tmp_path / choice)
    cached, decoded = results["on"], results["off"]
    assert list((tmp_path / "data" / "cache" / "images").glob("synthetic-*/train-32px"))
    assert cached.latent_stats == decoded.latent_stats
    weights = [torch.load(r.checkpoint, weights_only=True)["state_dict"] for r in (cached, decoded)]
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[0][name], tensor, rtol=0, atol=0, msg=name)
    assert list((tmp_path / "on" / "images").glob("inputs_reconstructions_step*.png"))
