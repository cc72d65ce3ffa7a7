"""The one way every image reaches a metric: resized and cropped to the evaluation resolution,
as uint8 pixels.

FID compares two sets of images; any difference in how the two sets were resampled shows up
in the score as if it were a difference in content (clean-fid's finding). So real validation
images, generated samples and VAE reconstructions all go through the training data's own resize
and center crop (:func:`ldm.data.transforms.image_to_uint8_tensor`), and the result is uint8,
the form in which generated samples are stored (lossless PNG).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from ldm.data.images import read_rgb_image
from ldm.data.transforms import image_to_uint8_tensor, model_tensor_to_uint8

RESIZE_METHOD = (
    "shorter side resized to the evaluation resolution (torchvision bilinear, antialiased), "
    "center-cropped square, uint8; the same for real, generated and reconstructed images"
)


def eval_pixels(image: Image.Image, resolution_px: int) -> torch.Tensor:
    """One RGB image → (3, R, R) uint8 at the evaluation resolution."""
    return image_to_uint8_tensor(image.convert("RGB"), resolution_px)


def eval_pixels_of_model_images(images: torch.Tensor, resolution_px: int) -> torch.Tensor:
    """(B, 3, H, W) model-space images in [-1, 1] → (B, 3, R, R) uint8.

    Quantised to 8 bits first, exactly as their PNGs are written, so scoring the tensors and
    scoring the saved files give the same number.
    """
    pixels = model_tensor_to_uint8(images.detach().cpu())
    if pixels.shape[-1] == resolution_px and pixels.shape[-2] == resolution_px:
        return pixels
    as_images = (Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels)
    return torch.stack([image_to_uint8_tensor(image, resolution_px) for image in as_images])


def read_eval_pixels(paths: Sequence[Path], resolution_px: int) -> torch.Tensor:
    """Image files → (B, 3, R, R) uint8, decoded like training data (any mode to RGB)."""
    return torch.stack([eval_pixels(read_rgb_image(path), resolution_px) for path in paths])


def batched(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    """Consecutive slices of at most ``batch_size`` items."""
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def number_of_batches(count: int, batch_size: int) -> int:
    """How many batches ``batched`` makes of ``count`` items (for progress bars)."""
    return -(-count // batch_size)
