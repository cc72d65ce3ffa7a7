"""The synthetic set's judge, ``read_attributes``, on images whose answers are known: straight
from the generator at every resolution a demo samples at, and softened the way a VAE softens
them, where a judge that counts pixels above a colour threshold misreads rounded corners and
blurred extents as another shape or size."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.data.synthetic import SyntheticConfig, generate_synthetic_dataset, read_attributes
from ldm.evaluation import adherence
from ldm.evaluation.pixels import eval_pixels


@pytest.mark.parametrize("resolution_px", [32, 64])
def test_the_generators_images_are_read_right_at_demo_resolutions(
    synthetic_root: Path, resolution_px: int
) -> None:
    check = adherence.check_analyser(synthetic_root, resolution_px)
    assert check.accuracy == dict.fromkeys(adherence.ATTRIBUTES, 1.0)


def test_blurred_images_keep_their_shape_size_and_colour(synthetic_root: Path) -> None:
    """A Gaussian blur of 1.5 px at 64 px (about what a briefly trained VAE does to edges)
    conserves each shape's mass and where it sits; the binary-threshold judge this replaced read
    9.5% of these as another shape."""
    palette = adherence.dataset_config(synthetic_root).variant_spec.palette
    pairs = adherence.generator_images(synthetic_root, 200)
    misread = []
    for path, drawn in pairs:
        pixels = eval_pixels(Image.open(path), 64).permute(1, 2, 0).numpy()
        blurred = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1.5))
        seen = read_attributes(blurred, palette)
        misread += [(path.name, name) for name in adherence.ATTRIBUTES if seen[name] != drawn[name]]
    assert not misread


@pytest.fixture(scope="module")
def judged_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 validation and held-out images: enough to tell a 5% misread rate from 20%."""
    config = SyntheticConfig(num_train=1, num_val=150, num_heldout=50, seed=5)
    return generate_synthetic_dataset(tmp_path_factory.mktemp("judged") / "synthetic", config)


def test_grainy_images_keep_their_shape_size_and_colour(judged_set: Path) -> None:
    """Sampled images are grainy. Gaussian noise of 16/255 per pixel channel at 32 px leaves
    every shape plain to the eye; the judge before this one read 20% of squares and triangles
    as circles (the interior's grain clipped at full coverage, specks of background noise
    widening the shape's box), and must not now read any circle as a square."""
    palette = adherence.dataset_config(judged_set).variant_spec.palette
    pairs = adherence.generator_images(judged_set)
    noise = np.random.default_rng(0)
    misread: Counter[str] = Counter()
    for path, drawn in pairs:
        pixels = eval_pixels(Image.open(path), 32).permute(1, 2, 0).numpy().astype(np.float64)
        grainy = np.clip(pixels + noise.normal(0.0, 16.0, pixels.shape), 0, 255).astype(np.uint8)
        seen = read_attributes(grainy, palette)
        misread.update(name for name in adherence.ATTRIBUTES if seen[name] != drawn[name])
        assert not (drawn["shape"] == "circle" and seen["shape"] == "square"), path.name
    assert max(misread.values(), default=0) <= 0.05 * len(pairs), misread
