"""Loading captioned images: outputs, caption choice, seeded randomness, resumable order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import synthetic_data_config

from ldm.data.batch_randomness import StepRandomness
from ldm.data.coco_index import build_caption_index, normalise_caption
from ldm.data.config import DataConfig
from ldm.data.datamodule import CaptionedImageDataModule, LoaderSettings
from ldm.data.dataset import CaptionedImageDataset
from ldm.data.resumable_loader import ResumableDataLoader, ResumableSampler


def coco_datamodule(
    coco_sample: Path, cache_dir: Path, *, seed: int = 0, **changes: object
) -> CaptionedImageDataModule:
    """A data module over the real COCO sample, 20% of it held out for validation, set up;
    ``changes`` replace keys of its data config."""
    values = {
        "source": "coco",
        "root": str(coco_sample),
        "train": {
            "annotations": str(coco_sample / "annotations" / "captions_sample.json"),
            "images": str(coco_sample / "images"),
        },
        "val": None,
        "val_fraction": 0.2,
        "batch_size": 4,
    }
    config = DataConfig.from_dict(values | changes)
    module = CaptionedImageDataModule(config, LoaderSettings(), seed=seed, cache_dir=cache_dir)
    module.setup("fit")
    return module


def test_real_coco_sample_indexes_every_image_with_five_captions(coco_sample: Path) -> None:
    records, report = build_caption_index(
        coco_sample / "annotations" / "captions_sample.json", coco_sample / "images"
    )
    assert report.total == 0
    assert len(records) == 58
    assert all(len(r.captions) == 5 for r in records)


def test_captions_are_whitespace_normalised(coco_records, coco_sample: Path) -> None:
    raw = json.loads((coco_sample / "annotations" / "captions_sample.json").read_text())
    assert any(
        a["caption"] != a["caption"].strip() or "\n" in a["caption"] for a in raw["annotations"]
    )
    for caption in (c for r in coco_records for c in r.captions):
        assert caption == caption.strip()
        assert "\n" not in caption and "  " not in caption


def test_normalise_caption_collapses_newlines_and_runs_of_spaces() -> None:
    assert normalise_caption("  A dog\n on  a\tbeach. ") == "A dog on a beach."


def test_items_are_square_rgb_tensors_in_minus_one_to_one(coco_records) -> None:
    dataset = CaptionedImageDataset(coco_records[:6], 128, train=False)
    images = []
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape == (3, 128, 128)
        assert item["image"].dtype == torch.float32
        assert item["image_id"] == coco_records[index].image_id
        images.append(item["image"])
    stacked = torch.stack(images)
    assert stacked.min() >= -1 and stacked.max() <= 1
    assert stacked.min() < -0.9 and stacked.max() > 0.9  # the whole range is used, not [0, 1]


def test_other_image_sizes_are_honoured(coco_records) -> None:
    assert CaptionedImageDataset(coco_records[:1], 64, train=True)[0]["image"].shape == (3, 64, 64)


def test_evaluation_takes_the_first_caption_and_never_flips(coco_records) -> None:
    dataset = CaptionedImageDataset(coco_records[:3], 64, train=False)
    for index in range(3):
        first, second = dataset[(index, 1)], dataset[(index, 2)]
        assert first["caption"] == coco_records[index].captions[0]
        assert torch.equal(first["image"], second["image"])


def test_training_picks_captions_among_the_images_own(coco_records) -> None:
    dataset = CaptionedImageDataset(coco_records[:1], 64, train=True)
    chosen = {dataset[(0, seed)]["caption"] for seed in range(40)}
    assert chosen <= set(coco_records[0].captions)
    assert len(chosen) >= 3


def test_training_flip_is_random_and_fixed_by_the_item_seed(coco_records) -> None:
    dataset = CaptionedImageDataset(coco_records[:1], 64, train=True)
    images = [dataset[(0, seed)]["image"] for seed in range(16)]
    flipped = [torch.equal(img, images[0].flip(-1)) for img in images]
    assert any(flipped) and not all(flipped)
    torch.manual_seed(1)  # neither the global random state nor the order of reads matters
    again = CaptionedImageDataset(coco_records[:1], 64, train=True)
    assert all(torch.equal(again[(0, seed)]["image"], images[seed]) for seed in reversed(range(16)))


def test_subset_keeps_the_first_images_in_file_order(coco_sample: Path, coco_records) -> None:
    subset, _ = build_caption_index(
        coco_sample / "annotations" / "captions_sample.json", coco_sample / "images", subset=5
    )
    assert [r.image_id for r in subset] == [r.image_id for r in coco_records[:5]]


def test_datamodule_holds_out_a_seeded_validation_fraction(coco_sample: Path, tmp_path) -> None:
    def split(seed: int) -> tuple[set[int], set[int]]:
        module = coco_datamodule(coco_sample, tmp_path, seed=seed)
        return {r.image_id for r in module.train_records}, {r.image_id for r in module.val_records}

    train, val = split(0)
    assert len(val) == round(58 * 0.2) and not train & val and len(train | val) == 58
    assert split(0) == (train, val)
    assert split(1) != (train, val)


def test_datamodule_loaders_yield_batches_from_the_real_fixture(
    coco_sample: Path, tmp_path
) -> None:
    module = coco_datamodule(coco_sample, tmp_path, image_size=64)
    module.train_randomness = StepRandomness(posterior_noise_shape=(4, 8, 8))
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["image_id"].shape == (4,) and "caption" not in batch  # the VAE reads no text
    assert batch["posterior_noise"].shape == (4, 4, 8, 8)
    val_batch = next(iter(module.val_dataloader()))
    assert val_batch["image"].shape[1:] == (3, 64, 64)
    assert len(val_batch["caption"]) == val_batch["image"].shape[0]


def test_a_batch_larger_than_the_training_set_is_refused_with_the_fix(
    coco_sample: Path, tmp_path
) -> None:
    module = coco_datamodule(coco_sample, tmp_path, batch_size=64)
    with pytest.raises(ValueError, match=r"Only 46 training images for data.batch_size=64"):
        module.train_dataloader()


def test_datamodule_uses_worker_processes_when_configured(synthetic_root: Path, tmp_path) -> None:
    config = synthetic_data_config(synthetic_root)
    module = CaptionedImageDataModule(
        config, LoaderSettings(num_workers=2, persistent_workers=True), seed=0, cache_dir=tmp_path
    )
    module.setup("fit")
    loader = module.train_dataloader()
    serial = CaptionedImageDataModule(config, LoaderSettings(), seed=0, cache_dir=tmp_path)
    serial.setup("fit")
    parallel_ids = [b["image_id"] for b in loader]
    serial_batches = list(serial.train_dataloader())
    assert loader.persistent_workers and loader.num_workers == 2
    assert all(
        torch.equal(a, b["image_id"]) for a, b in zip(parallel_ids, serial_batches, strict=True)
    )


class KeyEcho(torch.utils.data.Dataset):
    """Returns the (index, item seed) key it was asked for, so tests can see the order."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        return key


def _loader(size: int, seed: int, batch_size: int = 4) -> ResumableDataLoader:
    dataset = KeyEcho(size)
    return ResumableDataLoader(
        dataset, sampler=ResumableSampler(size, seed=seed), batch_size=batch_size, drop_last=True
    )


def _indices(batch) -> list[int]:
    return batch[0].tolist()


def test_shuffling_is_seeded_and_changes_every_epoch() -> None:
    loader = _loader(32, seed=1)
    epoch0 = [_indices(b) for b in loader]
    loader.sampler.set_epoch(1)
    epoch1 = [_indices(b) for b in loader]
    again = _loader(32, seed=1)
    assert [_indices(b) for b in again] == epoch0
    assert epoch0 != epoch1
    assert sorted(i for b in epoch0 for i in b) == list(range(32))


def test_resumed_loader_continues_with_exactly_the_remaining_batches() -> None:
    uninterrupted = _loader(40, seed=3)
    uninterrupted.sampler.set_epoch(2)
    expected = [(_indices(b), b[1].tolist()) for b in uninterrupted]

    first = _loader(40, seed=3)
    first.sampler.set_epoch(2)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(4)]
    state = first.state_dict()

    resumed = _loader(40, seed=3)
    resumed.load_state_dict(state)
    rest = [(_indices(b), b[1].tolist()) for b in resumed]
    assert [(_indices(b), b[1].tolist()) for b in seen] + rest == expected
    assert resumed.state_dict()["batches_served"] == len(expected)


def test_resume_with_a_different_batch_size_is_refused() -> None:
    state = _loader(40, seed=3).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        _loader(40, seed=3, batch_size=8).load_state_dict(state)


def test_ranks_receive_disjoint_equal_shards() -> None:
    shards = [
        [index for index, _ in ResumableSampler(50, seed=0, num_replicas=3, rank=rank)]
        for rank in range(3)
    ]
    assert all(len(shard) == 16 for shard in shards)
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
