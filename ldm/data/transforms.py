"""Image preprocessing shared by every source: resize shorter side, crop, maybe flip, to [-1, 1]."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F


def image_to_model_tensor(
    image: Image.Image, image_size_px: int, flip: bool = False
) -> torch.Tensor:
    """Resize the shorter side to ``image_size_px``, center-crop a square, scale to [-1, 1].

    Returns a float32 tensor (3, image_size_px, image_size_px). The flip decision is made by the
    caller so that its randomness can be seeded per item (resumable, worker-independent).
    """
    tensor = F.pil_to_tensor(image)  # (3, H, W) uint8
    tensor = F.resize(tensor, [image_size_px], antialias=True)
    tensor = F.center_crop(tensor, [image_size_px, image_size_px])
    if flip:
        tensor = F.horizontal_flip(tensor)
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)


def model_tensor_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map model-space images in [-1, 1] back to uint8 pixels (the inverse used for logging)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
