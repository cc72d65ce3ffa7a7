"""Train/val loaders over COCO-format captions, seeded and resumable, tuned per device."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.data.batch_randomness import NO_RANDOMNESS, StepRandomness
from ldm.data.coco_index import CaptionedImage, build_caption_index
from ldm.data.config import DataConfig
from ldm.data.dataset import CaptionedImageDataset, batch_as_is
from ldm.data.image_cache import (
    CachedImageDataset,
    ImageCache,
    ensure_image_cache,
    image_cache_enabled,
)
from ldm.data.resumable_datamodule import ResumableDataModule
from ldm.data.resumable_loader import ResumableDataLoader
from ldm.data.synthetic import generate_synthetic_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderSettings:
    """Per-device DataLoader choices (see ``conf/trainer/default.yaml`` profiles)."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False

    def dataloader_args(self, batch_size: int) -> dict[str, Any]:
        """The DataLoader keyword arguments these settings stand for."""
        return {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }


def hold_out(
    records: list[CaptionedImage], fraction: float, seed: int
) -> tuple[list[CaptionedImage], list[CaptionedImage]]:
    """Split one source into train/val by a seeded shuffle of image ids (stable across runs)."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = max(1, round(len(records) * fraction))
    if num_val >= len(records):
        raise ValueError(
            f"data.val_fraction={fraction} leaves no training images out of {len(records)}"
        )
    val_positions = set(order[:num_val])
    train = [r for i, r in enumerate(records) if i not in val_positions]
    val = [r for i, r in enumerate(records) if i in val_positions]
    return train, val


class CaptionedImageDataModule(ResumableDataModule):
    """COCO captions (or the synthetic set, or any COCO-format folder) as Lightning loaders.

    With the decoded-image cache on (``data.image_cache``; ``auto`` = when ``train_device`` is
    CUDA), batches are gathered from it and carry uint8 images for the module to convert on the
    device; otherwise images are decoded on the fly into [-1, 1] floats.
    """

    def __init__(
        self,
        config: DataConfig,
        loader: LoaderSettings,
        *,
        seed: int,
        cache_dir: Path,
        train_device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        self.loader = loader
        self.seed = seed
        self.cache_dir = Path(cache_dir)
        self.uses_image_cache = image_cache_enabled(config.image_cache, train_device)
        self.train_records: list[CaptionedImage] = []
        self.val_records: list[CaptionedImage] = []
        # What each training step draws with its batch; the training module states it.
        self.train_randomness: StepRandomness = NO_RANDOMNESS
        self._image_caches: dict[str, ImageCache] = {}

    @classmethod
    def from_config(
        cls,
        data_cfg: Any,
        loader: LoaderSettings,
        *,
        seed: int,
        cache_dir: Path,
        train_device: torch.device | str = "cpu",
    ) -> CaptionedImageDataModule:
        """Build from the ``data`` node of a Hydra config (a DictConfig or plain dict)."""
        raw = data_cfg
        if OmegaConf.is_config(data_cfg):
            raw = OmegaConf.to_container(data_cfg, resolve=True)
        return cls(
            DataConfig.from_dict(raw),
            loader,
            seed=seed,
            cache_dir=cache_dir,
            train_device=train_device,
        )

    def prepare_data(self) -> None:
        """Generate the synthetic set if asked for it, check every image once (the results are
        cached for the other processes' ``setup``) and build stale or missing image caches.

        Lightning runs this in one process (per node with ``prepare_data_per_node``) while the
        others wait, so files are written once, never raced.
        """
        self.generate_source()
        self.setup()
        if self.uses_image_cache:
            for split in ("train", "val"):
                self._image_cache(split)

    def generate_source(self) -> None:
        """Write the synthetic set when ``data.source=synthetic`` (unless it is already there)."""
        if self.config.source == "synthetic":
            generate_synthetic_dataset(self.config.root, self.config.synthetic)

    def _index(self, split, subset: int | None) -> list[CaptionedImage]:
        records, report = build_caption_index(
            split.annotations,
            split.images,
            subset=subset,
            verify_images=self.config.verify_images,
            check_cache_dir=self.cache_dir / "image-checks",
        )
        report.resolve(self.config.on_bad_input)
        if not records:
            found = (
                f"{report.summary()}\nFix or replace those files, or point data.root at a "
                "complete copy of the data set."
                if report.total
                else "it lists no images. Check the paths in the data config."
            )
            raise ValueError(
                f"No usable images in {split.annotations} (images from {split.images}): {found}"
            )
        return records

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        train = self._index(self.config.train, self.config.subset)
        if self.config.val is not None:
            val = self._index(self.config.val, self.config.val_subset)
        else:
            train, val = hold_out(train, self.config.val_fraction, self.seed)
        self.train_records, self.val_records = train, val
        log.info("Data: %d training and %d validation images", len(train), len(val))

    def _image_cache(self, split: str) -> ImageCache:
        """One split's decoded-image cache, checked (and built if stale) once per process."""
        if split not in self._image_caches:
            digest = hashlib.sha1(str(self.config.root.resolve()).encode()).hexdigest()[:10]
            folder = (
                self.cache_dir
                / "images"
                / f"{self.config.source}-{digest}"
                / f"{split}-{self.config.image_size}px"
            )
            self._image_caches[split] = ensure_image_cache(
                folder,
                self.train_records if split == "train" else self.val_records,
                image_size_px=self.config.image_size,
                batch_size=self.config.batch_size,
                num_workers=self.loader.num_workers,
            )
        return self._image_caches[split]

    def _dataset(
        self, split: str, *, train: bool, randomness: StepRandomness = NO_RANDOMNESS
    ) -> CaptionedImageDataset | CachedImageDataset:
        records = self.train_records if split == "train" else self.val_records
        hflip = self.config.hflip
        if self.uses_image_cache:
            return CachedImageDataset(
                self._image_cache(split), records, train=train, hflip=hflip, randomness=randomness
            )
        return CaptionedImageDataset(
            records, self.config.image_size, train=train, hflip=hflip, randomness=randomness
        )

    def _common_loader_args(self) -> dict:
        return {
            **self.loader.dataloader_args(self.config.batch_size),
            "collate_fn": batch_as_is,  # the datasets batch in __getitems__
        }

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = self._dataset("train", train=True, randomness=self.train_randomness)
        return self.resumable_train_loader(dataset, seed=self.seed, **self._common_loader_args())

    def measurement_dataloader(self) -> DataLoader:
        """Training images without augmentation, in order: for measuring latent statistics."""
        dataset = self._dataset("train", train=False)
        return DataLoader(dataset, shuffle=False, drop_last=False, **self._common_loader_args())

    def val_dataloader(self) -> DataLoader:
        """This process's shard of the validation images, in order."""
        return self.evaluation_loader(
            self._dataset("val", train=False), **self._common_loader_args()
        )
