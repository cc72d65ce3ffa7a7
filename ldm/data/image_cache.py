"""Every image of a split decoded, resized and cropped once: stage 1 without JPEG decoding.

At a thousand images per second and more, decoding and resizing COCO's JPEGs outruns eight
loader workers; gathering a batch from one uint8 array does not. The batches stay uint8 all the
way to the device (4× fewer bytes through the loader and the host→GPU copy) and become
[-1, 1] floats there (:func:`~ldm.data.transforms.to_model_range`), with exactly the numbers the
decoding path gives. The same keys make the same caption and flip choices on both paths.

Layout (N images of side S): ``pixels.npy`` (N, 3, S, S) uint8 — 49 MB per 1,000 images at
128 px, 5.8 GB for COCO train — and ``image_ids.npy`` (N,) int64, row i being record i.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ldm.data.array_store import building_cache, cache_is_current, open_complete_cache
from ldm.data.batch_randomness import NO_RANDOMNESS, ItemKey, StepRandomness, draw_batch_choices
from ldm.data.coco_index import CaptionedImage
from ldm.data.dataset import collate_skipping_unreadable, read_image_or_skip
from ldm.data.transforms import image_to_uint8_tensor

log = logging.getLogger(__name__)

DECODED_IMAGES_KIND = "decoded_images"
IMAGE_CACHE_CHOICES = ("auto", "on", "off")
# Bump when image_to_uint8_tensor resamples differently: every cache is then rebuilt.
PIXELS_VERSION = 1


def image_cache_enabled(choice: str, train_device: torch.device | str) -> bool:
    """``data.image_cache``: on, off, or auto — on when training on CUDA, where decoding is the
    bottleneck; elsewhere the model is slower than the decoders and a cache only costs disk."""
    if choice not in IMAGE_CACHE_CHOICES:
        raise ValueError(f"data.image_cache must be one of {IMAGE_CACHE_CHOICES}, got {choice!r}")
    return choice == "on" or (choice == "auto" and torch.device(train_device).type == "cuda")


def image_files_fingerprint(records: Sequence[CaptionedImage]) -> str:
    """SHA-256 of each record's id, file path, size and modification time, in order: what the
    pixels depend on. Captions are left out (they are read from the records), so editing them
    costs no re-decoding, while a replaced image file is noticed even under the same name."""
    digest = hashlib.sha256()
    for record in records:
        try:
            stat = record.path.stat()
            signature = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            signature = None  # gone since the up-front check: building will say so
        entry = [record.image_id, os.path.abspath(record.path), signature]
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest()


def image_cache_key(records: Sequence[CaptionedImage], image_size_px: int) -> dict[str, Any]:
    """Everything the cached pixels depend on; the cache is rebuilt when any of it changes."""
    return {
        "images_sha256": image_files_fingerprint(records),
        "count": len(records),
        "image_size": image_size_px,
        "pixels_version": PIXELS_VERSION,
    }


@dataclass(frozen=True)
class ImageCache:
    """An opened decoded-image cache; the arrays are read-only memory maps."""

    folder: Path
    metadata: dict[str, Any]
    pixels: np.ndarray  # (N, 3, S, S) uint8
    image_ids: np.ndarray  # (N,) int64

    @classmethod
    def open(cls, folder: Path) -> ImageCache:
        hint = "Build it with CaptionedImageDataModule.prepare_data() (training does this first)."
        arrays = ("pixels", "image_ids")
        return cls(**open_complete_cache(folder, DECODED_IMAGES_KIND, hint, arrays))

    def __reduce__(self) -> tuple:
        """Pickle as the folder name: loader workers reopen the memory maps themselves."""
        return (ImageCache.open, (self.folder,))

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def ensure_image_cache(
    folder: Path,
    records: Sequence[CaptionedImage],
    *,
    image_size_px: int,
    batch_size: int,
    num_workers: int = 0,
) -> ImageCache:
    """The cache of ``records`` at ``folder``, built first when missing or stale."""
    key = image_cache_key(records, image_size_px)
    if cache_is_current(folder, DECODED_IMAGES_KIND, key, policy="rebuild"):
        return ImageCache.open(folder)
    log.info("Building the decoded-image cache at %s (%d images)", folder, len(records))
    return build_image_cache(
        folder,
        records,
        key=key,
        image_size_px=image_size_px,
        batch_size=batch_size,
        num_workers=num_workers,
    )


class _DecodedImages(Dataset):
    """Items ``{"image": (3, S, S) uint8, "image_id"}`` decoded from files; None: unreadable."""

    def __init__(self, records: Sequence[CaptionedImage], image_size_px: int) -> None:
        self.records = records
        self.image_size_px = image_size_px

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        image = read_image_or_skip(record, self.image_size_px)
        if image is None:
            return None
        return {
            "image": image_to_uint8_tensor(image, self.image_size_px),
            "image_id": record.image_id,
        }


def decoded_batches(
    records: list[CaptionedImage],
    *,
    image_size_px: int,
    batch_size: int,
    num_workers: int,
    what: str,
    alternative: str = "",
) -> Iterator[tuple[slice, dict[str, Any]]]:
    """``records`` decoded in order by ``num_workers`` loader processes: each batch (uint8
    ``image`` (B, 3, S, S), ``image_id``) with the rows of the ``what`` cache it fills.

    An image unreadable since the up-front check stops the build (``alternative``: what else the
    user can do): skipping it would shift every later row against its record.
    """
    loader = DataLoader(
        _DecodedImages(records, image_size_px),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skipping_unreadable,
    )
    start = 0
    for batch in tqdm(loader, desc=f"Caching {what}", dynamic_ncols=True):
        expected = records[start : start + batch_size]
        got = set() if batch is None else set(batch["image_id"].tolist())
        unreadable = [str(record.path) for record in expected if record.image_id not in got]
        if unreadable:
            raise RuntimeError(
                f"Could not read {len(unreadable)} image(s) while caching {what}, though they "
                f"passed the up-front check: {unreadable[:5]}. Fix or remove those files (and "
                "the image-check cache under paths.cache_dir/image-checks), then run again"
                f"{alternative}."
            )
        stop = start + len(expected)
        yield slice(start, stop), batch
        start = stop


def build_image_cache(
    folder: Path,
    records: Sequence[CaptionedImage],
    *,
    key: dict[str, Any],
    image_size_px: int,
    batch_size: int,
    num_workers: int = 0,
) -> ImageCache:
    """Decode ``records`` in ``num_workers`` loader processes into a new cache at ``folder``."""
    records = list(records)
    batches = decoded_batches(
        records,
        image_size_px=image_size_px,
        batch_size=batch_size,
        num_workers=num_workers,
        what="decoded images",
        alternative=", or set data.image_cache=off to decode on the fly and skip them",
    )
    with building_cache(folder) as writer:
        shape = (len(records), 3, image_size_px, image_size_px)
        pixels = writer.new_array("pixels.npy", shape, np.uint8)
        image_ids = writer.new_array("image_ids.npy", (len(records),), np.int64)
        for rows, batch in batches:
            pixels[rows] = batch["image"].numpy()
            image_ids[rows] = batch["image_id"].numpy()
        writer.finish(
            DECODED_IMAGES_KIND,
            key,
            {"count": len(records), "shape": list(shape), "dtype": "uint8"},
        )
    return ImageCache.open(folder)


class CachedImageDataset(Dataset):
    """Batches ``{"image": (B, 3, S, S) uint8, "image_id": (B,) int64}`` gathered from an
    :class:`ImageCache` with one indexing operation, plus the step's random tensors
    (``randomness``); evaluation batches also carry each image's first caption.

    Caption and flip choices come from the same generator, drawn in the same order, as
    :class:`~ldm.data.dataset.CaptionedImageDataset`'s, so both paths give the same batches.
    """

    def __init__(
        self,
        cache: ImageCache,
        records: Sequence[CaptionedImage],
        *,
        train: bool,
        hflip: bool = True,
        randomness: StepRandomness = NO_RANDOMNESS,
    ) -> None:
        image_ids = np.fromiter((record.image_id for record in records), np.int64, len(records))
        if not np.array_equal(np.asarray(cache.image_ids), image_ids):
            raise ValueError(
                f"The decoded-image cache at {cache.folder} holds other images than this split "
                f"({len(cache)} cached, {len(records)} wanted). Delete the folder to rebuild it."
            )
        self.cache = cache
        self.records = records
        self.num_captions = torch.tensor([len(record.captions) for record in records])
        self.train = train
        self.hflip = hflip and train
        self.randomness = randomness

    def __len__(self) -> int:
        return len(self.cache)

    def __getitems__(self, keys: Sequence[ItemKey]) -> dict[str, Any]:
        choices = draw_batch_choices(keys, self.num_captions, can_flip=self.hflip, train=self.train)
        rows = choices.index.numpy()
        images = torch.from_numpy(self.cache.pixels[rows])  # (B, 3, S, S) uint8
        if self.hflip:
            images = torch.where(choices.flip[:, None, None, None], images.flip(-1), images)
        batch: dict[str, Any] = {
            "image": images,
            "image_id": torch.from_numpy(self.cache.image_ids[rows]),
        }
        if not self.train:
            batch["caption"] = [
                self.records[i].captions[c]
                for i, c in zip(rows.tolist(), choices.caption_index.tolist(), strict=True)
            ]
        return batch | self.randomness.draw(len(keys), choices.generator)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        """One item, as the batch of one it belongs to (for inspection and tests)."""
        batch = self.__getitems__([key])
        return {name: value[0] for name, value in batch.items()}
