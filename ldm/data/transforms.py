"""Image preprocessing shared by every source: resize shorter side, crop, maybe flip, to [-1, 1]."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F


def image_to_uint8_tensor(image: Image.Image, image_size_px: int) -> torch.Tensor:
    """Resize the shorter side to ``image_size_px`` and center-crop a square: (3, S, S) uint8.

    The one place pixels are resampled, so decoded-image caches and on-the-fly decoding agree.
    """
    tensor = F.pil_to_tensor(image)  # (3, H, W) uint8
    tensor = F.resize(tensor, [image_size_px], antialias=True)
    return F.center_crop(tensor, [image_size_px, image_size_px])


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 in [-1, 1] (the same numbers as the decoding path); float images,
    already in model range, pass through. Called on the device, so loaders ship 4× fewer bytes."""
    if images.dtype != torch.uint8:
        return images
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def image_to_model_tensor(
    image: Image.Image, image_size_px: int, flip: bool = False
) -> torch.Tensor:
    """Resize the shorter side to ``image_size_px``, center-crop a square, scale to [-1, 1].

    Returns a float32 tensor (3, image_size_px, image_size_px). The flip decision is made by the
    caller so that its randomness can be seeded per item (resumable, worker-independent).
    """
    tensor = image_to_uint8_tensor(image, image_size_px)
    if flip:
        tensor = F.horizontal_flip(tensor)
    return to_model_range(tensor)


def model_tensor_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map model-space images in [-1, 1] back to uint8 pixels (the inverse used for logging)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
