"""The embedded demo dataset: COCO format, deterministic, attributes readable from pixels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from helpers import SMALL_SYNTHETIC
from PIL import Image

from ldm.data import build_caption_index
from ldm.data.synthetic import (
    SyntheticConfig,
    attribute_combinations,
    generate_synthetic_dataset,
    read_attributes,
    split_combinations,
)

ATTRIBUTE_KEYS = ("shape", "color", "background", "size")


def _load(root: Path, split_file: str) -> dict:
    return json.loads((root / "annotations" / split_file).read_text())


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_gives_byte_identical_datasets(synthetic_root: Path, tmp_path: Path) -> None:
    again = generate_synthetic_dataset(tmp_path / "again", SMALL_SYNTHETIC)
    assert _tree_digest(again) == _tree_digest(synthetic_root)


def test_another_seed_gives_another_dataset(synthetic_root: Path, tmp_path: Path) -> None:
    config = SyntheticConfig(**{**SMALL_SYNTHETIC.__dict__, "seed": SMALL_SYNTHETIC.seed + 1})
    other = generate_synthetic_dataset(tmp_path / "other", config)
    assert _tree_digest(other) != _tree_digest(synthetic_root)


def test_an_up_to_date_dataset_is_not_regenerated(synthetic_root: Path) -> None:
    marker = synthetic_root / "train2017" / "000000000001.jpg"
    before = marker.stat().st_mtime_ns
    generate_synthetic_dataset(synthetic_root, SMALL_SYNTHETIC)
    assert marker.stat().st_mtime_ns == before


def test_every_split_loads_through_the_coco_loader(synthetic_root: Path) -> None:
    counts = {}
    for split_file, folder in [
        ("captions_train2017.json", "train2017"),
        ("captions_val2017.json", "val2017"),
        ("captions_heldout.json", "heldout"),
    ]:
        records, report = build_caption_index(
            synthetic_root / "annotations" / split_file, synthetic_root / folder
        )
        assert report.total == 0
        counts[folder] = len(records)
    assert counts == {
        "train2017": SMALL_SYNTHETIC.num_train,
        "val2017": SMALL_SYNTHETIC.num_val,
        "heldout": SMALL_SYNTHETIC.num_heldout,
    }


def test_each_image_has_several_differently_worded_captions(synthetic_root: Path) -> None:
    document = _load(synthetic_root, "captions_train2017.json")
    by_image: dict[int, list[str]] = {}
    for annotation in document["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    for image in document["images"]:
        captions = by_image[image["id"]]
        assert len(set(captions)) == len(captions) >= 5
        assert all(
            image["attributes"]["color"] in c and image["attributes"]["background"] in c
            for c in captions
        )


def test_attributes_are_recoverable_from_pixels(synthetic_root: Path) -> None:
    for split_file, folder in [
        ("captions_train2017.json", "train2017"),
        ("captions_heldout.json", "heldout"),
    ]:
        for image in _load(synthetic_root, split_file)["images"]:
            pixels = Image.open(synthetic_root / folder / image["file_name"])
            expected = {key: image["attributes"][key] for key in ATTRIBUTE_KEYS}
            assert read_attributes(pixels) == expected, image["file_name"]


def test_heldout_combinations_never_appear_in_training_or_validation(synthetic_root: Path) -> None:
    def triples(split_file: str) -> set[tuple[str, str, str]]:
        return {
            (i["attributes"]["shape"], i["attributes"]["color"], i["attributes"]["background"])
            for i in _load(synthetic_root, split_file)["images"]
        }

    heldout = triples("captions_heldout.json")
    assert heldout
    assert not heldout & triples("captions_train2017.json")
    assert not heldout & triples("captions_val2017.json")


def test_every_single_attribute_stays_in_training() -> None:
    train, heldout = split_combinations(SyntheticConfig())
    assert len(heldout) == round(len(attribute_combinations()) * 0.1)
    for slot in range(3):
        assert {c[slot] for c in train} == {c[slot] for c in attribute_combinations()}
