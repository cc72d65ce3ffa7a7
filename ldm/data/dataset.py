"""A map-style dataset of captioned images whose random choices are drawn per batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ldm.data.batch_randomness import (
    NO_RANDOMNESS,
    BatchChoices,
    ItemKey,
    StepRandomness,
    draw_batch_choices,
)
from ldm.data.coco_index import CaptionedImage
from ldm.data.images import ImageReadError, read_rgb_image
from ldm.data.transforms import image_to_model_tensor

log = logging.getLogger(__name__)


class CaptionedImageDataset(Dataset):
    """Items ``{"image": (3,S,S) in [-1,1], "caption": str, "image_id": int}``; batches (what
    ``__getitems__`` gives the loader) add the step's random tensors (``randomness``).

    Training picks a random caption and a random horizontal flip; evaluation takes the first
    caption and never flips. Those choices come from a generator keyed by the batch's item
    seeds, so a resumed run (or a different number of workers) reproduces them exactly.
    Training batches leave the captions out: the VAE never reads them.
    """

    def __init__(
        self,
        records: list[CaptionedImage],
        image_size_px: int,
        *,
        train: bool,
        hflip: bool = True,
        randomness: StepRandomness = NO_RANDOMNESS,
    ) -> None:
        if image_size_px < 8:
            raise ValueError(f"data.image_size must be at least 8 pixels, got {image_size_px}")
        self.records = records
        self.num_captions = torch.tensor([len(record.captions) for record in records])
        self.image_size_px = image_size_px
        self.train = train
        self.hflip = hflip and train
        self.randomness = randomness

    def __len__(self) -> int:
        return len(self.records)

    def _item(self, index: int, caption_index: int, flip: bool) -> dict[str, Any] | None:
        record = self.records[index]
        image = read_image_or_skip(record, self.image_size_px)
        if image is None:
            return None
        return {
            "image": image_to_model_tensor(image, self.image_size_px, flip=flip),
            "caption": record.captions[caption_index],
            "image_id": record.image_id,
        }

    def _drawn_items(
        self, keys: Sequence[ItemKey]
    ) -> tuple[list[dict[str, Any] | None], BatchChoices]:
        choices = draw_batch_choices(keys, self.num_captions, can_flip=self.hflip, train=self.train)
        items = [
            self._item(index, caption_index, flip)
            for index, caption_index, flip in zip(
                choices.index.tolist(),
                choices.caption_index.tolist(),
                choices.flip.tolist(),
                strict=True,
            )
        ]
        return items, choices

    def __getitem__(self, key: ItemKey) -> dict[str, Any] | None:
        items, _ = self._drawn_items([key])
        return items[0]

    def __getitems__(self, keys: Sequence[ItemKey]) -> dict[str, Any] | None:
        """One batch: the readable images collated, plus the step's random tensors."""
        items, choices = self._drawn_items(keys)
        batch = collate_skipping_unreadable(items)
        if batch is None:
            return None
        if self.train:
            del batch["caption"]
        return batch | self.randomness.draw(batch["image"].shape[0], choices.generator)


def read_image_or_skip(record: CaptionedImage, image_size_px: int) -> Image.Image | None:
    """The record's image, or None (with a warning) when its file changed or broke after the
    up-front check: the caller skips it rather than crash an epoch."""
    try:
        return read_rgb_image(record.path, min_size_px=image_size_px)
    except ImageReadError as error:
        log.warning("Skipping an unreadable image: %s", error)
        return None


def collate_skipping_unreadable(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Batch the readable items; a batch with none left becomes None (the step is skipped)."""
    readable = [item for item in items if item is not None]
    return default_collate(readable) if readable else None


def batch_as_is(batch: Any) -> Any:
    """The loader's collate function for datasets whose ``__getitems__`` already batches."""
    return batch
