"""The embedded demo dataset: COCO format, deterministic, attributes readable from pixels, in
two variants (a: the demo's own; b: another palette, wording and held-out split)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import SMALL_SYNTHETIC, compose_config
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.coco_index import build_caption_index
from ldm.data.config import DataConfig
from ldm.data.synthetic import (
    VARIANTS,
    SyntheticConfig,
    VariantSpec,
    attribute_combinations,
    caption_attributes,
    generate_synthetic_dataset,
    main,
    prompt_caption,
    read_attributes,
    split_combinations,
)
from ldm.evaluation import adherence

ATTRIBUTE_KEYS = ("shape", "color", "background", "size")
# Variant b's small set, with enough validation and held-out images to score the analyser.
SMALL_SYNTHETIC_B = dataclasses.replace(SMALL_SYNTHETIC, variant="b", num_val=100, num_heldout=100)
# SHA-256 of the annotation files and synthetic.json of SMALL_SYNTHETIC as the generator wrote
# them before variants existed (recorded with that code): variant a must keep writing exactly
# these, or every existing demo set would be regenerated and its caches rebuilt.
VARIANT_A_JSON_SHA256 = "41f8a37e0ae7cf56e2c4ad9a3e91b6fb4da734b55ed96c193f8ea5dbb5483862"
# The colours the demo recipe was tuned on, as drawn before variants existed.
VARIANT_A_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}


@pytest.fixture(scope="module")
def synthetic_b_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "synthetic-b", SMALL_SYNTHETIC_B
    )


@pytest.fixture(params=["a", "b"])
def variant_root(request: pytest.FixtureRequest) -> Path:
    """The small set of each variant in turn."""
    return request.getfixturevalue("synthetic_root" if request.param == "a" else "synthetic_b_root")


def _load(root: Path, split_file: str) -> dict:
    return json.loads((root / "annotations" / split_file).read_text())


def _tree_digest(root: Path, pattern: str = "*") -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _palette(root: Path) -> dict[str, tuple[int, int, int]]:
    return adherence.dataset_config(root).variant_spec.palette


def _caption_pattern(template: str, spec: VariantSpec) -> re.Pattern[str]:
    """A caption template as a regular expression whose {fields} match ``spec``'s words."""
    words = {
        "shape": [w for ws in spec.shape_words.values() for w in ws],
        "size": [w for ws in spec.size_words.values() for w in ws],
        "color": list(spec.palette),
        "background": list(spec.palette),
    }
    parts = re.split(r"\{(\w+)\}", template)  # text, field, text, field, ..., text
    return re.compile(
        "".join(
            re.escape(part) if index % 2 == 0 else f"(?P<{part}>{'|'.join(words[part])})"
            for index, part in enumerate(parts)
        )
    )


def _in_words_of(matched: dict[str, str], wanted: dict[str, str], spec: VariantSpec) -> bool:
    """Whether the words a caption matched say ``wanted`` in ``spec``'s vocabulary."""
    allowed = {
        "shape": spec.shape_words[wanted["shape"]],
        "size": spec.size_words[wanted["size"]],
        "color": (wanted["color"],),
        "background": (wanted["background"],),
    }
    return all(word in allowed[field] for field, word in matched.items())


def _positional(heldout: list[tuple[str, str, str]], variant: str) -> set[tuple[str, int, int]]:
    """Held-out triples with colours as palette positions, comparable across variants."""
    names = list(VARIANTS[variant].palette)
    return {(shape, names.index(color), names.index(bg)) for shape, color, bg in heldout}


def test_same_config_gives_byte_identical_datasets_whatever_the_global_random_state(
    synthetic_root: Path, tmp_path: Path
) -> None:
    random.seed(1)
    np.random.seed(1)
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


def test_each_image_has_several_differently_worded_captions(variant_root: Path) -> None:
    document = _load(variant_root, "captions_train2017.json")
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


def test_every_caption_reads_back_as_what_its_image_shows(variant_root: Path) -> None:
    spec = adherence.dataset_config(variant_root).variant_spec
    document = _load(variant_root, "captions_train2017.json")
    attributes = {image["id"]: image["attributes"] for image in document["images"]}
    sizes_named = 0
    for annotation in document["annotations"]:
        asked = caption_attributes(annotation["caption"], spec)
        assert asked is not None, annotation["caption"]
        drawn = attributes[annotation["image_id"]]
        assert asked == {name: drawn[name] for name in asked}, annotation["caption"]
        sizes_named += "size" in asked
    assert 0 < sizes_named < len(document["annotations"])  # some templates leave size out


def test_a_caption_is_read_whatever_its_case_and_other_text_is_not() -> None:
    spec = VARIANTS["a"]
    assert caption_attributes("  A Small RED Circle on a blue background ", spec) == {
        "size": "small",
        "color": "red",
        "shape": "circle",
        "background": "blue",
    }
    assert caption_attributes("large red round shape, blue background", spec)["shape"] == "circle"
    assert caption_attributes("a small red circle on a blue background at dusk", spec) is None
    assert caption_attributes("a small red circle on a teal background", spec) is None  # b's
    assert caption_attributes("a small disc painted magenta, set on navy", spec) is None


def test_attributes_are_recoverable_from_pixels(variant_root: Path) -> None:
    palette = _palette(variant_root)
    for split_file, folder in [
        ("captions_train2017.json", "train2017"),
        ("captions_heldout.json", "heldout"),
    ]:
        for image in _load(variant_root, split_file)["images"]:
            pixels = Image.open(variant_root / folder / image["file_name"])
            expected = {key: image["attributes"][key] for key in ATTRIBUTE_KEYS}
            assert read_attributes(pixels, palette) == expected, image["file_name"]


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


@pytest.mark.parametrize("variant", ["a", "b"])
def test_every_single_attribute_stays_in_training(variant: str) -> None:
    train, heldout = split_combinations(SyntheticConfig(variant=variant))
    every = attribute_combinations(VARIANTS[variant].palette)
    assert len(heldout) == round(len(every) * 0.1)
    for slot in range(3):
        assert {c[slot] for c in train} == {c[slot] for c in every}


# ---- variants -----------------------------------------------------------------------------------


def test_variant_a_writes_the_same_annotations_and_manifest_as_before_variants(
    synthetic_root: Path,
) -> None:
    assert _tree_digest(synthetic_root, "*.json") == VARIANT_A_JSON_SHA256


def test_variant_a_draws_the_colours_the_demo_was_tuned_on(synthetic_root: Path) -> None:
    for image in _load(synthetic_root, "captions_train2017.json")["images"]:
        pixels = np.asarray(Image.open(synthetic_root / "train2017" / image["file_name"]))
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        drawn = np.median(border, axis=0)
        wanted = VARIANT_A_RGB[image["attributes"]["background"]]
        assert np.abs(drawn - wanted).max() <= 4, (image["file_name"], drawn, wanted)


def test_variant_a_prompts_keep_their_wording(synthetic_root: Path) -> None:
    for asked in adherence.prompt_sets(synthetic_root, 6).values():
        for prompt, w in asked.items():
            wording = f"a {w['size']} {w['color']} {w['shape']} on a {w['background']} background"
            assert prompt == wording


def test_variant_b_names_and_draws_other_colours() -> None:
    a, b = VARIANTS["a"].palette, VARIANTS["b"].palette
    assert len(b) == len(a)
    assert not set(a) & set(b)
    assert not set(a.values()) & set(b.values())


def test_variant_b_captions_are_its_templates_said_in_its_words(synthetic_b_root: Path) -> None:
    spec = VARIANTS["b"]
    patterns = [_caption_pattern(template, spec) for template in spec.templates]
    document = _load(synthetic_b_root, "captions_train2017.json")
    attributes = {image["id"]: image["attributes"] for image in document["images"]}
    for annotation in document["annotations"]:
        caption, wanted = annotation["caption"], attributes[annotation["image_id"]]
        matches = [m.groupdict() for p in patterns if (m := p.fullmatch(caption))]
        assert any(_in_words_of(words, wanted, spec) for words in matches), caption


def test_variant_b_is_worded_unlike_variant_a(synthetic_b_root: Path) -> None:
    a, b = VARIANTS["a"], VARIANTS["b"]
    a_patterns = [_caption_pattern(template, b) for template in a.templates]  # b's words
    for annotation in _load(synthetic_b_root, "captions_train2017.json")["annotations"]:
        assert not any(p.fullmatch(annotation["caption"]) for p in a_patterns), annotation

    def synonyms(spec: VariantSpec) -> set[str]:
        lists = (*spec.shape_words.values(), *spec.size_words.values())
        return {word for words in lists for word in words[1:]}  # the first is the plain name

    assert not synonyms(a) & synonyms(b)


@pytest.mark.parametrize("seed", [0, SMALL_SYNTHETIC.seed])
def test_variant_b_holds_out_other_colour_pairs(seed: int) -> None:
    held = {
        variant: _positional(
            split_combinations(SyntheticConfig(seed=seed, variant=variant))[1], variant
        )
        for variant in ("a", "b")
    }
    assert len(held["a"]) == len(held["b"])
    assert len(held["a"] & held["b"]) <= len(held["a"]) // 4  # not a relabelled copy of a's split


@pytest.mark.parametrize("resolution_px", [64, 48])
def test_analyser_reads_variant_b_images_right_at_judging_resolutions(
    synthetic_b_root: Path, resolution_px: int
) -> None:
    check = adherence.check_analyser(synthetic_b_root, resolution_px)
    assert check.num_images == 200
    assert check.passed, check.accuracy


def test_variant_b_prompts_are_worded_and_judged_as_variant_b(synthetic_b_root: Path) -> None:
    spec = VARIANTS["b"]
    prompts = adherence.prompt_sets(synthetic_b_root, 6)
    assert prompts.palette == spec.palette
    heldout = {tuple(c) for c in adherence.read_manifest(synthetic_b_root)["heldout_combinations"]}
    first = _caption_pattern(spec.templates[0], spec)
    for split, asked in prompts.items():
        for prompt, wanted in asked.items():
            match = first.fullmatch(prompt)
            assert match and _in_words_of(match.groupdict(), wanted, spec), prompt
            triple = (wanted["shape"], wanted["color"], wanted["background"])
            assert (triple in heldout) == (split == "heldout"), prompt


def test_adherence_reads_variant_b_samples_with_variant_b_colours(synthetic_b_root: Path) -> None:
    spec = VARIANTS["b"]
    drawn = {
        prompt_caption(wanted, spec): (wanted, path)
        for path, wanted in adherence.generator_images(synthetic_b_root, 40)
    }
    prompts = adherence.PromptSets({"val": {p: w for p, (w, _) in drawn.items()}}, spec.palette)

    def generator_drawings(split: str, asked: list[str]):
        for prompt in asked:
            yield prompt, Image.open(drawn[prompt][1])

    scores = adherence.measure_adherence(prompts, generator_drawings)["val"]
    assert scores.accuracy == dict.fromkeys(adherence.ATTRIBUTES, 1.0)


def test_unknown_variant_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'c'.*\['a', 'b'\]"):
        SyntheticConfig(variant="c")


CLI_SIZES = ["--num-train", "6", "--num-val", "2", "--num-heldout", "2"]


def test_cli_writes_the_variant_it_is_asked_for(tmp_path: Path) -> None:
    main(["--root", str(tmp_path / "b"), "--variant", "b", *CLI_SIZES])
    assert adherence.dataset_config(tmp_path / "b").variant == "b"


def test_cli_refuses_an_unknown_variant_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path / "c"), "--variant", "c", *CLI_SIZES])
    error = capsys.readouterr().err
    assert "--variant" in error and "invalid choice" in error
    assert not (tmp_path / "c").exists()


def test_data_synthetic_b_trains_on_variant_b_in_its_own_folder() -> None:
    def data(*overrides: str) -> DataConfig:
        cfg = compose_config("train_unet", ["experiment=demo", *overrides])
        return DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))

    default, other = data(), data("data=synthetic_b")
    assert (default.synthetic.variant, other.synthetic.variant) == ("a", "b")
    assert other.root != default.root
    assert dataclasses.replace(other.synthetic, variant="a") == default.synthetic
