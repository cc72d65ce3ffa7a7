"""A map-style dataset of captioned images whose random choices are seeded per item."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from ldm.data.coco_index import CaptionedImage
from ldm.data.images import ImageReadError, read_rgb_image
from ldm.data.transforms import image_to_model_tensor

log = logging.getLogger(__name__)

# A sampler may hand the dataset either a plain index or (index, augmentation seed).
ItemKey = int | tuple[int, int]


class CaptionedImageDataset(Dataset):
    """Yields ``{"image": (3,S,S) in [-1,1], "caption": str, "image_id": int}``.

    Training picks a random caption and a random horizontal flip; evaluation takes the first
    caption and never flips. When the key carries a seed, those choices depend only on it, so a
    resumed run (or a different number of workers) reproduces them exactly.
    """

    def __init__(
        self,
        records: list[CaptionedImage],
        image_size_px: int,
        *,
        train: bool,
        hflip: bool = True,
    ) -> None:
        if image_size_px < 8:
            raise ValueError(f"data.image_size must be at least 8 pixels, got {image_size_px}")
        self.records = records
        self.image_size_px = image_size_px
        self.train = train
        self.hflip = hflip and train

    def __len__(self) -> int:
        return len(self.records)

    def _random_choices(self, seed: int | None, num_captions: int) -> tuple[int, bool]:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        caption_index = int(torch.randint(num_captions, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < 0.5) if self.hflip else False
        return caption_index, flip

    def __getitem__(self, key: ItemKey) -> dict[str, Any] | None:
        index, seed = key if isinstance(key, tuple) else (key, None)
        record = self.records[index]
        caption_index, flip = (
            self._random_choices(seed, len(record.captions)) if self.train else (0, False)
        )
        try:
            image = read_rgb_image(record.path, min_size_px=self.image_size_px)
        except ImageReadError as error:
            # The file changed or broke after the up-front check: skip it, never crash the epoch.
            log.warning("Skipping unreadable image during training: %s", error)
            return None
        return {
            "image": image_to_model_tensor(image, self.image_size_px, flip=flip),
            "caption": record.captions[caption_index],
            "image_id": record.image_id,
        }


def collate_skipping_unreadable(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Batch the readable items; a batch with none left becomes None (the step is skipped)."""
    readable = [item for item in items if item is not None]
    return default_collate(readable) if readable else None
