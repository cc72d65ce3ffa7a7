"""Bad input never crashes an epoch and never vanishes silently."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.bad_input import BadInputError
from ldm.data.coco_index import build_caption_index
from ldm.data.dataset import CaptionedImageDataset, collate_skipping_unreadable
from ldm.data.images import read_rgb_image

GOOD_IMAGES = 4


def _write_coco(root: Path, images: list[dict], annotations: list[dict]) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.fixture
def planted(tmp_path: Path, synthetic_root: Path) -> tuple[Path, Path]:
    """A COCO-format folder with good images plus one of every kind of bad input."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    sources = sorted((synthetic_root / "train2017").glob("*.jpg"))
    images, annotations = [], []

    def add(image_id: int, file_name: str, captions: list[str]) -> None:
        images.append({"id": image_id, "file_name": file_name})
        for caption in captions:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "caption": caption}
            )

    for i in range(GOOD_IMAGES):
        shutil.copy(sources[i], image_dir / f"good{i}.jpg")
        add(i, f"good{i}.jpg", [f"good image {i}"])
    jpeg = sources[GOOD_IMAGES].read_bytes()
    (image_dir / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    add(100, "truncated.jpg", ["cut in half"])
    (image_dir / "corrupt.jpg").write_bytes(jpeg[:200] + bytes(range(256)) * 20)
    add(101, "corrupt.jpg", ["scrambled"])
    (image_dir / "empty.jpg").write_bytes(b"")
    add(102, "empty.jpg", ["zero bytes"])
    (image_dir / "notes.jpg").write_text("this is not an image")
    add(103, "notes.jpg", ["a text file"])
    add(104, "absent.jpg", ["listed but absent"])
    shutil.copy(sources[0], image_dir / "uncaptioned.jpg")
    add(105, "uncaptioned.jpg", [])
    annotations.append({"id": 999, "image_id": 424242, "caption": "an orphan caption"})
    return _write_coco(tmp_path, images, annotations), image_dir


EXPECTED_KINDS = {
    "corrupt, truncated or non-image file": 3,
    "zero-byte image file": 1,
    "image listed but absent": 1,
    "image without captions": 1,
    "caption pointing to an unknown image": 1,
}


def test_every_planted_bad_input_is_skipped_and_counted(planted) -> None:
    annotation_file, image_dir = planted
    records, report = build_caption_index(annotation_file, image_dir)
    assert sorted(r.path.name for r in records) == [f"good{i}.jpg" for i in range(GOOD_IMAGES)]
    assert {kind: report.count(kind) for kind in EXPECTED_KINDS} == EXPECTED_KINDS


def test_skipped_inputs_produce_one_summary_warning_with_examples(planted, caplog) -> None:
    _, report = build_caption_index(*planted)
    with caplog.at_level(logging.WARNING):
        report.resolve("warn")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "7 bad input(s)" in message
    for example in (
        "truncated.jpg",
        "empty.jpg",
        "absent.jpg",
        "uncaptioned.jpg",
        "annotation 999",
    ):
        assert example in message


def test_on_bad_input_error_refuses_to_start(planted) -> None:
    _, report = build_caption_index(*planted)
    with pytest.raises(
        BadInputError, match=r"(?s)7 bad input\(s\) found.*notes\.jpg.*data.on_bad_input=warn"
    ):
        report.resolve("error")


def test_missing_annotation_file_names_the_path_and_make_coco(tmp_path: Path) -> None:
    missing = tmp_path / "annotations" / "captions_train2017.json"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*make coco"):
        build_caption_index(missing, tmp_path)


def test_missing_image_folder_names_the_path_and_make_coco(planted, tmp_path: Path) -> None:
    annotation_file, _ = planted
    with pytest.raises(FileNotFoundError, match=r"train2017.*make coco"):
        build_caption_index(annotation_file, tmp_path / "train2017")


def test_annotation_file_that_is_not_json_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "captions.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_caption_index(bad, tmp_path)


def test_check_results_are_cached_and_invalidated_by_changes(planted, tmp_path: Path) -> None:
    annotation_file, image_dir = planted
    cache = tmp_path / "checks"
    build_caption_index(annotation_file, image_dir, check_cache_dir=cache)
    assert list(cache.glob("image-checks-*.json"))
    shutil.copy(image_dir / "good0.jpg", image_dir / "truncated.jpg")  # repaired
    records, _ = build_caption_index(annotation_file, image_dir, check_cache_dir=cache)
    assert "truncated.jpg" in {r.path.name for r in records}


def test_an_image_that_breaks_after_indexing_is_dropped_from_its_batch(planted) -> None:
    records, _ = build_caption_index(*planted)
    records[1].path.write_bytes(b"broken later")
    dataset = CaptionedImageDataset(records, 32, train=False)
    batch = collate_skipping_unreadable([dataset[i] for i in range(len(dataset))])
    assert batch["image"].shape[0] == GOOD_IMAGES - 1
    assert collate_skipping_unreadable([None, None]) is None


def _roundtrip(image: Image.Image, path: Path) -> np.ndarray:
    image.save(path)
    loaded = read_rgb_image(path)
    assert loaded.mode == "RGB"
    return np.asarray(loaded)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    pixels = _roundtrip(Image.new("L", (8, 8), 77), tmp_path / "gray.png")
    assert (pixels == 77).all()


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    pixels = _roundtrip(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    assert pixels[..., 0].mean() > 200 and pixels[..., 1:].mean() < 60  # red


def test_palette_becomes_rgb(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    pixels = _roundtrip(image, tmp_path / "palette.png")
    assert np.abs(pixels.astype(int) - (10, 200, 30)).max() <= 2


def test_transparency_is_composited_over_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    pixels = _roundtrip(image, tmp_path / "rgba.png")
    assert tuple(pixels[0, 0]) == (0, 0, 255)
    assert tuple(pixels[4, 4]) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32896, 65535, 65535]], dtype=np.uint16)
    pixels = _roundtrip(Image.fromarray(values), tmp_path / "deep.png")
    assert pixels[0, :, 0].tolist() == [0, 128, 255, 255]


def test_converted_modes_load_through_the_dataset(tmp_path: Path) -> None:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    modes = {"L": 90, "CMYK": (0, 0, 0, 0), "P": 3, "RGBA": (1, 2, 3, 4), "I;16": 1000}
    images, annotations = [], []
    for image_id, (mode, color) in enumerate(modes.items()):
        name = f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (20, 12), color).save(image_dir / name)
        images.append({"id": image_id, "file_name": name})
        annotations.append({"id": image_id, "image_id": image_id, "caption": mode})
    annotation_file = _write_coco(tmp_path, images, annotations)
    records, report = build_caption_index(annotation_file, image_dir)
    assert report.total == 0
    dataset = CaptionedImageDataset(records, 8, train=False)
    batch = collate_skipping_unreadable([dataset[i] for i in range(len(dataset))])
    assert batch["image"].shape == (len(modes), 3, 8, 8)
    assert torch.isfinite(batch["image"]).all()
