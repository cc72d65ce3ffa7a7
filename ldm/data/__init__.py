"""Data: COCO captions, the synthetic demo set, and the loaders that feed training."""

from ldm.data.coco_index import CaptionedImage, build_caption_index, normalise_caption
from ldm.data.config import DataConfig
from ldm.data.datamodule import CaptionedImageDataModule, LoaderSettings
from ldm.data.dataset import CaptionedImageDataset

__all__ = [
    "CaptionedImage",
    "CaptionedImageDataModule",
    "CaptionedImageDataset",
    "DataConfig",
    "LoaderSettings",
    "build_caption_index",
    "normalise_caption",
]
