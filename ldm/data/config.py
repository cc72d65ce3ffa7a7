"""The data section of the config, checked once, in one vocabulary for every stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.config.parse import dataclass_from_dict
from ldm.data.bad_input import ON_BAD_INPUT_CHOICES
from ldm.data.image_cache import IMAGE_CACHE_CHOICES
from ldm.data.synthetic import SyntheticConfig

SOURCES = ("coco", "synthetic")


@dataclass(frozen=True)
class SplitFiles:
    """One split in COCO captions layout: an annotation JSON and its image folder."""

    annotations: Path
    images: Path


@dataclass(frozen=True)
class DataConfig:
    """Mirrors ``conf/data/*.yaml``; see those files for what each key means."""

    source: str
    root: Path
    train: SplitFiles
    val: SplitFiles | None
    val_fraction: float | None = None
    image_size: int = 128
    subset: int | None = None
    val_subset: int | None = None
    batch_size: int = 32
    hflip: bool = True
    on_bad_input: str = "warn"
    verify_images: bool = True
    image_cache: str = "auto"
    # None: not a synthetic source (what conf/data/coco.yaml gives)
    synthetic: SyntheticConfig | None = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if isinstance(self.image_cache, bool):  # YAML 1.1 reads a bare on/off as a bool
            object.__setattr__(self, "image_cache", "on" if self.image_cache else "off")
        self.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        return dataclass_from_dict(cls, values, "data")

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        if self.on_bad_input not in ON_BAD_INPUT_CHOICES:
            raise ValueError(
                f"data.on_bad_input must be one of {ON_BAD_INPUT_CHOICES}, "
                f"got {self.on_bad_input!r}"
            )
        if self.image_cache not in IMAGE_CACHE_CHOICES:
            raise ValueError(
                f"data.image_cache must be one of {IMAGE_CACHE_CHOICES}, got "
                f"{self.image_cache!r}: on decodes every image once into a cache, off decodes "
                "on the fly, auto is on when training on CUDA."
            )
        if self.source == "synthetic" and self.synthetic is None:
            raise ValueError(
                "data.source=synthetic needs data.synthetic, the generator's settings: use "
                "data=synthetic (conf/data/synthetic.yaml)."
            )
        if self.val is None and not self.val_fraction:
            raise ValueError(
                "This data source has no validation split: set data.val_fraction (e.g. 0.1) to "
                "hold out part of the training images, or give data.val.annotations/images."
            )
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.batch_size < 1:
            raise ValueError(
                f"data.batch_size must be at least 1, got {self.batch_size}: set it to the "
                "number of images per training step (32 in the real run)."
            )
        if self.image_size < 8 or self.image_size % 8:
            raise ValueError(
                f"data.image_size must be a multiple of 8 (the VAE downsamples 8×), "
                f"got {self.image_size}"
            )
