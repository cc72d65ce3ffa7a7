"""The embedded demo dataset: coloured shapes on coloured backgrounds, in COCO captions format.

Every attribute in a caption (shape, colour, background, size) can be read back from the pixels
with :func:`read_attributes`, so later stages can measure whether generated images follow their
prompts. Some (shape, colour, background) combinations never appear in training and form the
``heldout`` split, which tests compositional generalisation.

The set comes in two variants drawn by the same generator. ``a`` is the demo's own set, the one
its recipe was tuned on. ``b`` has another palette, other caption wordings and other held-out
combinations, and is never tuned on: a recipe that only fits ``a``'s captions shows it there.

Run ``python -m ldm.data.synthetic --root data/synthetic`` (``make demo`` does it for you), or
``--root data/synthetic-b --variant b``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

GENERATOR_VERSION = 1

Palette = dict[str, tuple[int, int, int]]  # colour name → RGB
Triple = tuple[str, str, str]  # (shape, colour, background)

SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.32, "large": 0.62}  # shape extent as a fraction of the image side
# read_attributes: a square fills its box (1), a circle π/4 ≈ 0.785: the midpoint between them.
SQUARE_MIN_FILL = 0.89
# A triangle's centroid lies 1/6 of its height below its box's middle; a circle's and a
# square's at it. Half of 1/6 splits them.
TRIANGLE_CENTROID_OFFSET = 1 / 12


@dataclass(frozen=True)
class VariantSpec:
    """One look of the set. Shapes and sizes are shared by every variant, so the analyser reads
    them all alike once it knows the palette."""

    palette: Palette  # 8 colours, far apart: read_attributes names a colour by the nearest
    shape_words: dict[str, tuple[str, ...]]  # the first is the one evaluation prompts use
    size_words: dict[str, tuple[str, ...]]  # the first is the one evaluation prompts use
    templates: tuple[str, ...]  # at least CAPTIONS_PER_IMAGE; the first is the prompts' template
    seed_salt: int | None  # mixed into the seed; None: the seed alone, as before variants


VARIANTS = {
    "a": VariantSpec(
        palette={
            "red": (220, 40, 40),
            "green": (40, 170, 60),
            "blue": (40, 80, 220),
            "yellow": (240, 210, 40),
            "purple": (140, 60, 180),
            "orange": (245, 140, 30),
            "white": (245, 245, 245),
            "black": (20, 20, 20),
        },
        shape_words={
            "circle": ("circle", "disk", "dot", "round shape"),
            "square": ("square", "box", "block", "square shape"),
            "triangle": ("triangle", "wedge", "triangle shape", "three-sided shape"),
        },
        size_words={"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")},
        templates=(
            "a {size} {color} {shape} on a {background} background",
            "{background} backdrop with a {size} {color} {shape}",
            "a {color} {shape} against a plain {background} background",
            "there is a {size} {color} {shape} in front of a {background} wall",
            "an image of a {color} {shape} on {background}",
            "{size} {color} {shape}, {background} background",
            "a picture showing one {color} {shape} over a {background} field",
        ),
        seed_salt=None,
    ),
    "b": VariantSpec(
        palette={  # the nearest pair, navy–teal, is 101 apart in RGB (a's, yellow–orange: 71)
            "cyan": (40, 215, 230),
            "magenta": (225, 40, 190),
            "brown": (125, 75, 30),
            "pink": (250, 165, 195),
            "grey": (130, 130, 130),
            "navy": (20, 30, 110),
            "lime": (165, 235, 45),
            "teal": (15, 130, 125),
        },
        shape_words={
            "circle": ("circle", "disc", "ball", "round blob"),
            "square": ("square", "tile", "cube", "four-sided shape"),
            "triangle": ("triangle", "pyramid", "arrowhead", "pointed shape"),
        },
        size_words={
            "small": ("small", "miniature", "petite"),
            "large": ("large", "giant", "massive"),
        },
        templates=(
            "a {size} {shape} painted {color}, set on {background}",
            "on a {background} canvas sits a {size} {color} {shape}",
            "{color} {shape} resting on a {background} ground",
            "a photo of a {size} {shape} coloured {color} with {background} all around it",
            "the {shape} is {color}, the surface behind it {background}",
            "{size} {shape} in {color} over {background}",
            "a {background} surface with a {size} {color} {shape} somewhere on it",
        ),
        seed_salt=0xB,
    ),
}
ORIGINAL_VARIANT = "a"  # the demo's own set, which its recipe was tuned on
CAPTIONS_PER_IMAGE = 5
SPLIT_FOLDERS = {"train": "train2017", "val": "val2017", "heldout": "heldout"}


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate; two equal configs always produce byte-identical datasets."""

    num_train: int = 3000
    num_val: int = 300
    num_heldout: int = 200
    image_size_px: int = 128
    heldout_fraction: float = 0.1
    seed: int = 0
    variant: str = ORIGINAL_VARIANT  # a key of VARIANTS

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"Unknown synthetic variant {self.variant!r} (data.synthetic.variant or "
                f"--variant): choose one of {sorted(VARIANTS)} (a: the demo's own set; b: another "
                "palette, wording and held-out combinations, never tuned on)."
            )

    @property
    def variant_spec(self) -> VariantSpec:
        """The palette, wording and seed salt of this config's variant."""
        return VARIANTS[self.variant]

    def rng(self) -> np.random.Generator:
        """A fresh generator for this config: the seed, salted by the variant when it has a salt
        (variant a keeps the seed alone, so its output is what it was before variants)."""
        salt = self.variant_spec.seed_salt
        return np.random.default_rng(self.seed if salt is None else [self.seed, salt])


def attribute_combinations(palette: Palette) -> list[Triple]:
    """All (shape, colour, background) triples with a shape colour unlike its background."""
    return [
        (shape, color, background)
        for shape, color, background in itertools.product(SHAPES, palette, palette)
        if color != background
    ]


def split_combinations(config: SyntheticConfig) -> tuple[list[Triple], list[Triple]]:
    """Hold out a seeded fraction of triples while every single attribute stays in training."""
    combos = attribute_combinations(config.variant_spec.palette)
    rng = config.rng()
    num_heldout = max(1, round(len(combos) * config.heldout_fraction))
    heldout: list[Triple] = []
    for position in rng.permutation(len(combos)):
        if len(heldout) == num_heldout:
            break
        candidate = combos[position]
        remaining = [c for c in combos if c not in heldout and c != candidate]
        if all(any(c[slot] == candidate[slot] for c in remaining) for slot in range(3)):
            heldout.append(candidate)
    train = [c for c in combos if c not in heldout]
    return train, heldout


def _draw_shape(attributes: dict[str, Any], palette: Palette, side: int) -> Image.Image:
    """Render at 4× and downsample so edges are anti-aliased like a photograph's."""
    shape, size, (cx, cy) = attributes["shape"], attributes["size"], attributes["center"]
    fill = palette[attributes["color"]]
    scale = 4
    big = side * scale
    canvas = Image.new("RGB", (big, big), palette[attributes["background"]])
    draw = ImageDraw.Draw(canvas)
    half = SIZES[size] * big / 2
    cx, cy = cx * big, cy * big
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return canvas.resize((side, side), Image.Resampling.LANCZOS)


def _captions(rng: np.random.Generator, attributes: dict[str, Any], spec: VariantSpec) -> list[str]:
    templates = rng.choice(len(spec.templates), size=CAPTIONS_PER_IMAGE, replace=False)
    captions = []
    for template_index in templates:
        words = {
            "shape": str(rng.choice(spec.shape_words[attributes["shape"]])),
            "size": str(rng.choice(spec.size_words[attributes["size"]])),
            "color": attributes["color"],
            "background": attributes["background"],
        }
        captions.append(spec.templates[template_index].format(**words))
    return captions


def prompt_caption(attributes: dict[str, str], spec: VariantSpec) -> str:
    """The one wording evaluations prompt with: the variant's first template and first words
    (variant a: "a small red circle on a blue background")."""
    return spec.templates[0].format(
        shape=spec.shape_words[attributes["shape"]][0],
        size=spec.size_words[attributes["size"]][0],
        color=attributes["color"],
        background=attributes["background"],
    )


def caption_attributes(caption: str, spec: VariantSpec) -> dict[str, str] | None:
    """What a caption in one of the variant's wordings asks for (its size only where the template
    names one), or None for any other text: how a free prompt, such as the demo's, is judged.
    Case and surrounding spaces do not matter."""
    choices = {
        "shape": {word: shape for shape, words in spec.shape_words.items() for word in words},
        "size": {word: size for size, words in spec.size_words.items() for word in words},
        "color": {name: name for name in spec.palette},
        "background": {name: name for name in spec.palette},
    }

    def slot(match: re.Match[str]) -> str:
        words = sorted(choices[match[1]], key=len, reverse=True)  # "round shape" before "round"
        return f"(?P<{match[1]}>{'|'.join(map(re.escape, words))})"

    for template in spec.templates:
        pattern = re.sub(r"\\{(\w+)\\}", slot, re.escape(template))
        found = re.fullmatch(pattern, caption.strip(), flags=re.IGNORECASE)
        if found:
            return {name: choices[name][word.lower()] for name, word in found.groupdict().items()}
    return None


def _sample_attributes(rng: np.random.Generator, combos: list[Triple]) -> dict[str, Any]:
    shape, color, background = combos[int(rng.integers(len(combos)))]
    size = str(rng.choice(list(SIZES)))
    margin = SIZES[size] / 2 + 0.04
    center = [round(float(rng.uniform(margin, 1 - margin)), 4) for _ in range(2)]
    return {
        "shape": shape,
        "color": color,
        "background": background,
        "size": size,
        "center": center,
    }


def _write_split(
    root: Path,
    split: str,
    count: int,
    combos: list[Triple],
    config: SyntheticConfig,
    first_id: int,
    rng: np.random.Generator,
) -> None:
    folder = root / SPLIT_FOLDERS[split]
    folder.mkdir(parents=True)
    images, annotations = [], []
    for offset in tqdm(range(count), desc=f"Drawing {split} shapes", dynamic_ncols=True):
        image_id = first_id + offset
        attributes = _sample_attributes(rng, combos)
        file_name = f"{image_id:012d}.jpg"
        picture = _draw_shape(attributes, config.variant_spec.palette, config.image_size_px)
        picture.save(folder / file_name, quality=95)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": config.image_size_px,
                "height": config.image_size_px,
                "attributes": attributes,
            }
        )
        for caption in _captions(rng, attributes, config.variant_spec):
            annotations.append(
                {"id": len(annotations) + first_id * 10, "image_id": image_id, "caption": caption}
            )
    document = {
        "info": {
            "description": f"ldm-coco synthetic shapes, {split} split",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }
    (root / "annotations" / f"captions_{SPLIT_FOLDERS[split]}.json").write_text(
        json.dumps(document, indent=1)
    )


def _manifest(config: SyntheticConfig, heldout: list[Triple]) -> dict[str, Any]:
    recorded = asdict(config)
    if config.variant == ORIGINAL_VARIANT:  # so sets written before variants existed stay current
        del recorded["variant"]
    return {
        "generator_version": GENERATOR_VERSION,
        "config": recorded,
        "heldout_combinations": [list(c) for c in heldout],
    }


def manifest_config(manifest: dict[str, Any]) -> SyntheticConfig:
    """The config a ``synthetic.json`` records (one without a variant is variant a's)."""
    return SyntheticConfig(**manifest["config"])


def generate_synthetic_dataset(root: str | Path, config: SyntheticConfig) -> Path:
    """Write the dataset under ``root`` unless an identical one is already there.

    Builds into a temporary sibling folder and renames it, so an interrupted run never leaves a
    dataset that looks complete.
    """
    root = Path(root)
    train_combos, heldout_combos = split_combinations(config)
    manifest = _manifest(config, heldout_combos)
    manifest_file = root / "synthetic.json"
    if manifest_file.is_file() and json.loads(manifest_file.read_text()) == manifest:
        return root
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "annotations").mkdir(parents=True)
    rng = config.rng()
    _write_split(staging, "train", config.num_train, train_combos, config, 1, rng)
    _write_split(staging, "val", config.num_val, train_combos, config, 1_000_001, rng)
    _write_split(staging, "heldout", config.num_heldout, heldout_combos, config, 2_000_001, rng)
    (staging / "synthetic.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root


def _nearest_palette_color(rgb: np.ndarray, palette: Palette) -> str:
    names = list(palette)
    distances = [float(np.linalg.norm(rgb - np.array(palette[name]))) for name in names]
    return names[int(np.argmin(distances))]


def read_attributes(image: Image.Image | np.ndarray, palette: Palette) -> dict[str, str]:
    """Recover shape, colour, background and size from pixels alone.

    Background: the median colour of the border. Shape colour: the median of the pixels farthest
    from it. Every pixel's *coverage* is where it lies between the two colours (0 background,
    1 shape), so anti-aliased or softened edges count for the part of the pixel they cover and
    the reading does not depend on how far apart the two colours are. The shape's extent is the
    summed coverage of its rows and columns (its size), its fill the coverage over that box
    (square ≈ 1, circle ≈ π/4), and a triangle (apex up) is told by its mass sitting low: its
    centroid is a sixth of its height below the box's middle, where a circle's and a square's
    is at it. Colours are named after the nearest colour of ``palette``, the palette of the set
    the image belongs to.

    Noisy pixels (a sampled image's grain) must not turn squares into circles: coverage is
    measured against the median colour of the shape's interior, not of its farthest pixels,
    and summed without clipping at 1, so the grain averages out instead of leaving the
    interior partly covered; and specks of background noise away from the shape are dropped
    before they can widen its extent.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    pixels = pixels.astype(np.float64)
    side = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    far = distance > 60
    if far.sum() < 4:
        return _no_shape(background_rgb, palette)
    shape_rgb = np.median(pixels[distance >= np.median(distance[far])], axis=0)
    core = _coverage(pixels, background_rgb, shape_rgb) > 0.5
    if not core.any():
        return _no_shape(background_rgb, palette)
    interior_rgb = np.median(pixels[_interior(core)], axis=0)
    projection = _coverage(pixels, background_rgb, interior_rgb)
    coverage = np.clip(projection, 0.0, 1.0)
    coverage[coverage < 0.2] = 0.0  # faint noise in the background is not part of the shape
    coverage[~_within_one_pixel(coverage > 0.5)] = 0.0  # nor are specks away from the shape
    if not coverage.any():
        return _no_shape(background_rgb, palette)
    row_coverage, column_coverage = coverage.max(axis=1), coverage.max(axis=0)
    height, width = row_coverage.sum(), column_coverage.sum()
    fill = np.where(coverage > 0, projection, 0.0).sum() / (height * width)
    covered_rows = np.nonzero(row_coverage > 0.5)[0]
    top, bottom = covered_rows.min(), covered_rows.max()
    centroid_row = coverage.sum(axis=1) @ np.arange(side) / coverage.sum()
    sits_low = (centroid_row - (top + bottom) / 2) / (bottom - top + 1) > TRIANGLE_CENTROID_OFFSET
    shape = "triangle" if sits_low else "square" if fill > SQUARE_MIN_FILL else "circle"
    extent = max(height, width) / side
    threshold = (SIZES["small"] + SIZES["large"]) / 2
    return {
        "shape": shape,
        "color": _nearest_palette_color(shape_rgb, palette),
        "background": _nearest_palette_color(background_rgb, palette),
        "size": "small" if extent < threshold else "large",
    }


def _no_shape(background_rgb: np.ndarray, palette: Palette) -> dict[str, str]:
    background = _nearest_palette_color(background_rgb, palette)
    return {"background": background, "shape": "none", "color": "none", "size": "none"}


def _coverage(pixels: np.ndarray, background_rgb: np.ndarray, shape_rgb: np.ndarray) -> np.ndarray:
    """Each pixel's position on the line from the background colour (0) to the shape's (1)."""
    contrast = shape_rgb - background_rgb
    return (pixels - background_rgb) @ contrast / (contrast @ contrast)


def _neighbourhoods(mask: np.ndarray) -> np.ndarray:
    """(H, W, 3, 3): each pixel's 3×3 neighbourhood of ``mask``, False beyond the image."""
    return sliding_window_view(np.pad(mask, 1), (3, 3))


def _within_one_pixel(mask: np.ndarray) -> np.ndarray:
    return _neighbourhoods(mask).any(axis=(-2, -1))


def _interior(core: np.ndarray) -> np.ndarray:
    """The pixels of ``core`` whose whole neighbourhood is in it, away from the blended edge
    whose colour lies part-way to the background; the core itself when it is that thin."""
    interior = _neighbourhoods(core).all(axis=(-2, -1))
    return interior if interior.any() else core


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synthetic", help="output folder")
    defaults = SyntheticConfig()
    for name, value in asdict(defaults).items():
        choices = sorted(VARIANTS) if name == "variant" else None
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=type(value), default=value, choices=choices)
    args = vars(parser.parse_args(argv))
    root = generate_synthetic_dataset(args.pop("root"), SyntheticConfig(**args))
    print(f"Synthetic dataset ready in {root}")


if __name__ == "__main__":
    main()
