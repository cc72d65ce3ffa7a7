"""The validation split every data-based metric reads: FID's real images and captions, the
reconstruction inputs.

Only the validation annotations are indexed (COCO's 118k training images are never touched),
unless the source has no validation split and one is held out of the training images exactly
as training holds it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.data.coco_index import CaptionedImage, build_caption_index
from ldm.data.config import DataConfig
from ldm.data.datamodule import hold_out
from ldm.data.synthetic import generate_synthetic_dataset
from ldm.evaluation.errors import EvaluationError


@dataclass(frozen=True)
class ValidationSet:
    records: list[CaptionedImage]
    annotations: Path  # the file the records come from
    held_out_fraction: float | None  # set when the split was held out of the training images

    def describe(self) -> dict[str, Any]:
        return {
            "annotations": str(self.annotations),
            "held_out_fraction": self.held_out_fraction,
            "images": len(self.records),
        }


def prepare_data_source(data: DataConfig) -> None:
    """Generate the synthetic set if it is the source (a no-op when it is already there)."""
    if data.source == "synthetic":
        generate_synthetic_dataset(data.root, data.synthetic)


def load_validation_set(data: DataConfig, *, seed: int, cache_dir: Path) -> ValidationSet:
    """The usable validation images with their captions, in annotation-file order.

    ``seed`` matters only for a source without a validation split: it must be the training run's
    seed so the held-out images are the ones training never saw.
    """
    try:
        if data.val is not None:
            records = _index(
                data, data.val.annotations, data.val.images, data.val_subset, cache_dir
            )
            return ValidationSet(records, data.val.annotations, None)
        train = _index(data, data.train.annotations, data.train.images, data.subset, cache_dir)
        _, held_out = hold_out(train, data.val_fraction, seed)
        return ValidationSet(held_out, data.train.annotations, data.val_fraction)
    except (FileNotFoundError, ValueError) as error:  # BadInputError is a ValueError
        raise EvaluationError(f"Cannot read the validation images: {error}") from None


def _index(
    data: DataConfig, annotations: Path, images: Path, subset: int | None, cache_dir: Path
) -> list[CaptionedImage]:
    records, report = build_caption_index(
        annotations,
        images,
        subset=subset,
        verify_images=data.verify_images,
        check_cache_dir=cache_dir / "image-checks",
    )
    report.resolve(data.on_bad_input)
    if not records:
        raise ValueError(f"no usable images in {annotations} (images from {images})")
    return records


def validation_captions(records: list[CaptionedImage], count: int) -> list[str]:
    """``count`` captions in a fixed order: the first caption of every validation image, then
    (when more are needed) the second of every image, and so on."""
    captions = []
    for index in range(count):
        record = records[index % len(records)]
        round_number = index // len(records)
        captions.append(record.captions[round_number % len(record.captions)])
    return captions
