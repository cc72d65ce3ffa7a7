"""Prompt adherence on the synthetic set: do samples show the background, colour, shape and size
their prompt asks for, on combinations seen in training and on held-out ones?

The judge is :func:`ldm.data.synthetic.read_attributes`, which reads the attributes back from
the pixels. A judge is only worth its verdicts if it is right on images whose answers are known,
so :func:`check_analyser` first reads images straight from the synthetic generator (with the
attributes it recorded), at the resolution the samples will be judged at, and an evaluation
refuses to run when any attribute is read right less than 99% of the time. Colours are named
after the palette of the set being judged (its variant, recorded in ``synthetic.json``).

Beside each accuracy stand its chance level (1/7 background, 1/8 colour, 1/3 shape, 1/2 size)
and the VAE ceiling: how often an attribute survives a VAE round trip of a generator image.
Samples are decoded by that VAE, so they cannot show what it loses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.synthetic import (
    SHAPES,
    SIZES,
    SPLIT_FOLDERS,
    Palette,
    SyntheticConfig,
    VariantSpec,
    manifest_config,
    prompt_caption,
    read_attributes,
    split_combinations,
)
from ldm.data.transforms import model_tensor_to_uint8, to_model_range
from ldm.evaluation.errors import EvaluationError
from ldm.evaluation.pixels import eval_pixels
from ldm.evaluation.reconstruction import reconstruct
from ldm.models.vae import VAE

ATTRIBUTES = ("background", "color", "shape", "size")
CHANCE_LEVELS = {"background": 1 / 7, "color": 1 / 8, "shape": 1 / 3, "size": 1 / 2}
ANALYSER_MIN_ACCURACY = 0.99
# Which combinations each split's prompts ask for, and the seed that picks them.
PROMPT_SPLITS = {"train": 1, "heldout": 2}

Attributes = dict[str, str]
# (split, prompts) → (prompt, image) pairs, one or more per prompt; how is the caller's business.
Generate = Callable[[str, list[str]], Iterable[tuple[str, Image.Image | np.ndarray]]]
# (prompts, images (B, 3, H, W) in [-1, 1], img2img strength) → the model's images, same layout.
Denoise = Callable[[list[str], torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class AnalyserCheck:
    """How often ``read_attributes`` recovers what the generator drew, per attribute."""

    accuracy: dict[str, float]
    num_images: int
    resolution_px: int

    @property
    def passed(self) -> bool:
        return all(value >= ANALYSER_MIN_ACCURACY for value in self.accuracy.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "num_images": self.num_images,
            "resolution_px": self.resolution_px,
            "min_accuracy": ANALYSER_MIN_ACCURACY,
            "passed": self.passed,
        }


class PromptSets(dict[str, dict[str, Attributes]]):
    """Split → prompt → the attributes it asks for, with the palette that names their colours:
    the judge needs that palette to read a sample's colours back."""

    def __init__(self, splits: dict[str, dict[str, Attributes]], palette: Palette) -> None:
        super().__init__(splits)
        self.palette = palette


@dataclass(frozen=True)
class SplitAdherence:
    """Attribute accuracy of the samples for one split's prompts."""

    accuracy: dict[str, float]
    num_images: int

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "num_images": self.num_images}


def read_manifest(data_root: Path) -> dict[str, Any]:
    """The synthetic set's ``synthetic.json`` (its config and held-out combinations)."""
    path = Path(data_root) / "synthetic.json"
    if not path.is_file():
        raise EvaluationError(
            f"Prompt adherence needs the synthetic set, but {path} does not exist: evaluate "
            "with data=synthetic (or experiment=demo), or generate it with "
            f"`python -m ldm.data.synthetic --root {data_root}`."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def dataset_config(data_root: Path) -> SyntheticConfig:
    """The config the synthetic set under ``data_root`` was generated with, variant included."""
    return manifest_config(read_manifest(data_root))


def prompts_for(
    combos: Sequence[tuple[str, str, str]], count: int, seed: int, spec: VariantSpec
) -> dict[str, Attributes]:
    """``count`` prompts (seeded choice of combination and size) and the attributes they ask for.

    Every prompt uses the variant's first caption template and first words (variant a: "a small
    red circle on a blue background"), so it is worded as the set's own captions are.
    """
    rng = np.random.default_rng(seed)
    chosen: dict[str, Attributes] = {}
    for position in rng.permutation(len(combos))[:count]:
        shape, color, background = combos[position]
        size = str(rng.choice(list(SIZES)))
        wanted = {"shape": shape, "color": color, "background": background, "size": size}
        chosen[prompt_caption(wanted, spec)] = wanted
    return chosen


def prompt_sets(data_root: Path, num_prompts: int) -> PromptSets:
    """The prompts of each split: training combinations and held-out ones."""
    manifest = read_manifest(data_root)
    config = manifest_config(manifest)
    train_combos, _ = split_combinations(config)
    heldout_combos = [tuple(combo) for combo in manifest["heldout_combinations"]]
    combos = {"train": train_combos, "heldout": heldout_combos}
    splits = {
        split: prompts_for(combos[split], num_prompts, seed, config.variant_spec)
        for split, seed in PROMPT_SPLITS.items()
    }
    return PromptSets(splits, config.variant_spec.palette)


def attribute_accuracy(
    judged: Iterable[tuple[Attributes, Image.Image | np.ndarray]], palette: Palette
) -> dict:
    """Per attribute, the share of images whose pixels show what was asked (colours named
    after ``palette``, the palette of the set the prompts come from)."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    count = 0
    for wanted, image in judged:
        seen = read_attributes(image, palette)
        for name in ATTRIBUTES:
            hits[name] += seen[name] == wanted[name]
        count += 1
    if not count:
        raise ValueError("No images to judge")
    return {name: hits[name] / count for name in ATTRIBUTES}


def measure_adherence(prompts: PromptSets, generate: Generate) -> dict[str, SplitAdherence]:
    """Generate for each split's prompts and judge every image against its prompt."""
    results = {}
    for split, asked in prompts.items():
        judged = [(asked[prompt], image) for prompt, image in generate(split, list(asked))]
        results[split] = SplitAdherence(attribute_accuracy(judged, prompts.palette), len(judged))
    return results


def generator_images(
    data_root: Path, max_images: int | None = None
) -> list[tuple[Path, Attributes]]:
    """Validation and held-out images of the synthetic set with the attributes the generator
    recorded for them (the first ``max_images``; None: all)."""
    pairs: list[tuple[Path, Attributes]] = []
    for split in ("val", "heldout"):
        folder = SPLIT_FOLDERS[split]
        annotations = Path(data_root) / "annotations" / f"captions_{folder}.json"
        for image in json.loads(annotations.read_text(encoding="utf-8"))["images"]:
            wanted = {name: image["attributes"][name] for name in ATTRIBUTES}
            pairs.append((Path(data_root) / folder / image["file_name"], wanted))
    return pairs[:max_images]


def check_analyser(data_root: Path, resolution_px: int, max_images: int = 200) -> AnalyserCheck:
    """Read generator images, resized to the judging resolution, and score the analyser."""
    palette = dataset_config(data_root).variant_spec.palette
    pairs = generator_images(data_root, max_images)
    judged = (
        (wanted, _as_array(eval_pixels(Image.open(path), resolution_px))) for path, wanted in pairs
    )
    return AnalyserCheck(attribute_accuracy(judged, palette), len(pairs), resolution_px)


def require_reliable_analyser(check: AnalyserCheck) -> None:
    """Refuse to judge samples with an analyser that misreads the generator's own images."""
    if check.passed:
        return
    failing = ", ".join(
        f"{name} {100 * value:.1f}%"
        for name, value in check.accuracy.items()
        if value < ANALYSER_MIN_ACCURACY
    )
    raise EvaluationError(
        f"The attribute analyser (ldm.data.synthetic.read_attributes) reads only {failing} of "
        f"{check.num_images} images straight from the synthetic generator correctly at "
        f"{check.resolution_px} px (it must reach {100 * ANALYSER_MIN_ACCURACY:.0f}% on every "
        "attribute), so its verdicts on samples would mean nothing. Evaluate a model trained "
        "at a higher image size, or fix read_attributes for this resolution."
    )


def vae_ceiling(vae: VAE, data_root: Path, resolution_px: int, num_images: int) -> SplitAdherence:
    """How often each attribute the generator drew is still read from the VAE reconstruction
    of its image: an upper bound for what samples decoded by this VAE can show."""
    palette = dataset_config(data_root).variant_spec.palette
    pairs = generator_images(data_root, num_images)
    judged = []
    for path, drawn in pairs:
        original = eval_pixels(Image.open(path), resolution_px)
        judged.append((drawn, _as_array(reconstruct(vae, original[None])[0].cpu())))
    return SplitAdherence(attribute_accuracy(judged, palette), len(judged))


def renoised_adherence(
    denoise: Denoise,
    data_root: Path,
    resolution_px: int,
    strengths: Sequence[float],
    images_per_shape: int,
) -> dict[float, dict[str, SplitAdherence]]:
    """Where along the sampling chain a model loses what a picture shows.

    Generator images are noised to the level an img2img ``strength`` starts from and denoised
    with their own prompt, then judged against what was drawn: a small strength runs only the
    last, low-noise steps (what fails there is detail the denoiser cannot keep), a large one
    nearly the whole chain. Scores come per drawn shape and for "all", since a model can keep
    every circle and round off every square; the VAE ceiling is the strength-0 end.
    """
    spec = dataset_config(data_root).variant_spec
    by_shape: dict[str, list[tuple[Path, Attributes]]] = {shape: [] for shape in SHAPES}
    for path, drawn in generator_images(data_root):
        by_shape[drawn["shape"]].append((path, drawn))
    chosen = [pair for pairs in by_shape.values() for pair in pairs[:images_per_shape]]
    if not chosen:
        raise EvaluationError(f"No generator images under {data_root} to renoise.")
    prompts = [prompt_caption(drawn, spec) for _, drawn in chosen]
    originals = torch.stack([eval_pixels(Image.open(path), resolution_px) for path, _ in chosen])
    results = {}
    for strength in strengths:
        denoised = model_tensor_to_uint8(denoise(prompts, to_model_range(originals), strength))
        judged = [
            (drawn, _as_array(image.cpu()))
            for (_, drawn), image in zip(chosen, denoised, strict=True)
        ]
        groups = {"all": judged} | {
            shape: [pair for pair in judged if pair[0]["shape"] == shape] for shape in SHAPES
        }
        results[strength] = {
            name: SplitAdherence(attribute_accuracy(group, spec.palette), len(group))
            for name, group in groups.items()
            if group
        }
    return results


def _as_array(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8 tensor → (H, W, 3) array, the layout read_attributes takes."""
    return pixels.permute(1, 2, 0).numpy()
