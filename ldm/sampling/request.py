"""What the user asked ``sample.py`` for, checked once the U-Net is loaded (its T bounds the
steps) and before the VAE and the text encoder are.

Every image is one ``ImageJob``: its prompt, its position and its seed. Seeds are derived as
``seed + index`` over all images of the run (prompt-major), so any single image can be made again
alone with ``n=1 seed=<its recorded seed>``: the pipeline gives each image its own generator.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig
from PIL import Image

from ldm.data.images import ImageReadError, read_rgb_image
from ldm.diffusion import ScheduleConfig
from ldm.pipeline import COMPILE_MODES, SamplingOptions
from ldm.sampling.errors import SamplingError


@dataclass(frozen=True)
class ImageJob:
    """One image to make: which prompt, which of its ``n`` images, and its seed."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int


@dataclass(frozen=True)
class SampleRequest:
    prompts: tuple[str, ...]
    negative_prompt: str
    images_per_prompt: int
    batch_size: int
    seed: int
    options: SamplingOptions
    init_image_path: Path | None = None
    init_image: Image.Image | None = None
    compile_mode: str = "none"  # one of ldm.pipeline.COMPILE_MODES

    @property
    def full_batch_size(self) -> int:
        """The size of every model batch but perhaps the last, which padding brings up to it."""
        return min(self.batch_size, len(self.prompts) * self.images_per_prompt)

    def jobs(self) -> list[ImageJob]:
        """Every image of the run in order; image i (counting over all prompts) gets seed + i."""
        n = self.images_per_prompt
        return [
            ImageJob(p, j, prompt, self.seed + p * n + j)
            for p, prompt in enumerate(self.prompts)
            for j in range(n)
        ]

    def batches(self) -> Iterator[list[ImageJob]]:
        """The jobs in model batches of at most ``batch_size`` (prompts may share a batch)."""
        jobs = self.jobs()
        for start in range(0, len(jobs), self.batch_size):
            yield jobs[start : start + self.batch_size]


def request_from_config(cfg: DictConfig, diffusion: ScheduleConfig) -> SampleRequest:
    """Parse and check the sampling keys of ``conf/sample.yaml``; the init image is read here.

    ``diffusion`` is the loaded checkpoint's: its objective names the samplers that fit, and
    its T bounds a ddpm model's sampling steps.
    """
    init_path = None if cfg.init_image is None else Path(cfg.init_image)
    try:
        options = SamplingOptions.checked(
            diffusion=diffusion,
            sampler=cfg.sampler,
            steps=cfg.steps,
            cfg_scale=cfg.cfg_scale,
            guidance_interval=cfg.guidance_interval,
            eta=cfg.eta,
            strength=cfg.strength,
            image_to_image=init_path is not None,
        )
    except ValueError as error:
        raise SamplingError(str(error)) from None
    return SampleRequest(
        prompts=tuple(read_prompts(cfg.prompt, cfg.prompts_file)),
        negative_prompt=str(cfg.negative_prompt or ""),
        images_per_prompt=_positive_int("n", cfg.n),
        batch_size=_positive_int("batch_size", cfg.batch_size),
        seed=cfg.seed,
        options=options,
        init_image_path=init_path,
        init_image=None if init_path is None else read_init_image(init_path),
        compile_mode=_choice("compile", cfg.compile, COMPILE_MODES),
    )


def read_prompts(prompt: str | Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """The prompts from ``prompt=`` (one, or a list) or ``prompts_file=`` (one per line)."""
    if (prompt is None) == (prompts_file is None):
        both = "both" if prompt is not None else "neither"
        raise SamplingError(
            f"Give exactly one of prompt= and prompts_file= (got {both}): "
            'e.g. prompt="a red sports car" or prompts_file=prompts.txt (one prompt per line).'
        )
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise SamplingError(
                f"prompts_file={path} does not exist; give a text file with one prompt per line."
            )
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in prompts if line]
        if not prompts:
            raise SamplingError(f"prompts_file={path} holds no prompts (only blank lines).")
        return prompts
    if isinstance(prompt, list | tuple | ListConfig):
        prompts = [str(p) for p in prompt]
        if not prompts:
            raise SamplingError("prompt=[] is an empty list; give at least one prompt.")
        return prompts
    return [str(prompt)]


def read_init_image(path: Path) -> Image.Image:
    """The img2img start image as RGB, with a message instead of a decoder's traceback."""
    if not path.is_file():
        raise SamplingError(f"init_image={path} does not exist; give the path of a PNG or JPEG.")
    try:
        return read_rgb_image(path)
    except ImageReadError as error:
        raise SamplingError(
            f"init_image={path} cannot be read as an image ({error.__cause__ or error}). Give a "
            "complete PNG, JPEG or other image file PIL can open."
        ) from None


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise SamplingError(
            f"{name}={value!r} is not supported; choose one of {', '.join(choices)}."
        )
    return str(value)


def _positive_int(name: str, value: int) -> int:
    """Counts must be ≥ 1; that they are integers, the config schema has checked."""
    if value < 1:
        raise SamplingError(f"{name} must be at least 1, got {value}.")
    return value
