"""Writing samples: one PNG per image that records how it was made, and a labelled grid per prompt.

The record lives in the PNG's own text chunks (iTXt, so any prompt survives as UTF-8), not in a
side file that can be lost: any image can be traced to its prompt, seed, settings and the exact
U-Net weights, and made again. Nothing time-dependent is written, so the same run gives the same
bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ldm.data.transforms import model_tensor_to_uint8

GRID_MAX_COLUMNS = 4
GRID_MIN_WIDTH_PX = 512  # small images are enlarged (whole-pixel nearest) so the label is legible
LABEL_FONT_SIZE_PX = 16
LABEL_MARGIN_PX = 6
SLUG_MAX_CHARS = 40


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) model-space images in [-1, 1] → 8-bit RGB PIL images."""
    pixels = model_tensor_to_uint8(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(array, mode="RGB") for array in pixels]


def save_png(image: Image.Image, path: Path, metadata: Mapping[str, object]) -> Path:
    """Write ``image`` to ``path`` with every metadata item as a UTF-8 text chunk."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, str(value))
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: Path) -> dict[str, str]:
    """The text chunks of a PNG written by :func:`save_png`."""
    with Image.open(path) as image:
        image.load()
        return dict(image.text)


def prompt_slug(prompt: str) -> str:
    """A short, filesystem-safe form of a prompt for file names ("a-red-sports-car")."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:SLUG_MAX_CHARS].rstrip("-")
    return slug or "prompt"


def image_filename(prompt_index: int, prompt: str, seed: int) -> str:
    return f"{prompt_index:03d}-{prompt_slug(prompt)}-seed{seed}.png"


def grid_filename(prompt_index: int, prompt: str) -> str:
    return f"{prompt_index:03d}-{prompt_slug(prompt)}-grid.png"


def labelled_grid(images: Sequence[Image.Image], label: str) -> Image.Image:
    """The images in rows of up to ``GRID_MAX_COLUMNS``, under a strip with ``label`` written
    in it (wrapped to the grid's width)."""
    columns = min(len(images), GRID_MAX_COLUMNS)
    rows = math.ceil(len(images) / columns)
    tile_width, tile_height = images[0].size
    zoom = max(1, math.ceil(GRID_MIN_WIDTH_PX / (columns * tile_width)))
    tile_width, tile_height = tile_width * zoom, tile_height * zoom
    width = columns * tile_width

    font = ImageFont.load_default(size=LABEL_FONT_SIZE_PX)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(label, font, measure, width - 2 * LABEL_MARGIN_PX)
    line_height = LABEL_FONT_SIZE_PX + 4
    label_height = len(lines) * line_height + 2 * LABEL_MARGIN_PX

    grid = Image.new("RGB", (width, label_height + rows * tile_height), "white")
    draw = ImageDraw.Draw(grid)
    for row, line in enumerate(lines):
        draw.text((LABEL_MARGIN_PX, LABEL_MARGIN_PX + row * line_height), line, "black", font)
    for index, image in enumerate(images):
        tile = image.resize((tile_width, tile_height), Image.Resampling.NEAREST)
        column, row = index % columns, index // columns
        grid.paste(tile, (column * tile_width, label_height + row * tile_height))
    return grid


def _wrap(
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    draw: ImageDraw.ImageDraw,
    width: int,
) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a single over-long word gets a line of its own."""
    lines: list[str] = []
    for word in text.split() or [""]:
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines
