"""Prompt → image: the one sampling path used by validation grids and by ``sample.py``.

encode prompt ─► sampler loop with classifier-free guidance (``ldm.diffusion.sample``) ─►
undo the latent normalisation ─► VAE decode. Every image gets its own seeded generator, so an
image depends only on its prompt, its seed and the sampling options — not on its batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ldm.diffusion import (
    SAMPLERS,
    SAMPLERS_BY_OBJECTIVE,
    GuidanceInterval,
    Schedule,
    ScheduleConfig,
    sample,
)
from ldm.latent_norm import LatentNormalizer
from ldm.models.vae import VAE

# torch.compile modes for the U-Net forward of the sampling loop; "none" runs it eagerly (the
# reference). "reduce-overhead" adds CUDA graphs, which replay one recorded batch shape.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


DEFAULT_IMG2IMG_STRENGTH = 0.75  # keeps the layout of the init image, redraws its details
DEFAULT_SAMPLERS = {"ddpm": "ddim", "flow_matching": "euler"}  # where no sampler is named
STOCHASTIC_SAMPLERS = ("ddim", "euler")  # the samplers that take eta


@dataclass(frozen=True)
class SamplingOptions:
    """How to denoise. Options from a user or a config come in through ``checked``, once; the
    sampling path (this pipeline, the loop, the samplers) then trusts them."""

    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float = 7.5
    eta: float = 0.0
    strength: float = 1.0
    guidance_interval: GuidanceInterval | None = None  # None: guide at every noise level

    @classmethod
    def checked(
        cls,
        *,
        diffusion: ScheduleConfig,
        sampler: Any = None,
        steps: Any = 50,
        cfg_scale: Any = 7.5,
        eta: Any = 0.0,
        strength: Any = None,
        image_to_image: bool = False,
        guidance_interval: Any = None,
    ) -> SamplingOptions:
        """The one check of sampling options, where they enter: sample.py and evaluate.py once
        the checkpoint tells its diffusion config (objective and T), training when its module
        is built. Raises ValueError naming the value and the fix. ``sampler`` None is the
        objective's default; ``strength`` applies to image-to-image only (None: the default);
        ``guidance_interval`` is None or [low, high], noise-to-signal ratios, None for an open
        end."""
        if sampler is None:
            sampler = DEFAULT_SAMPLERS[diffusion.objective]
        _check_sampler(sampler, diffusion.objective)
        steps = _integer("steps", steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}.")
        # A ddpm model knows T timesteps; flow matching's σ is continuous, any count works.
        num_train_timesteps = diffusion.num_train_timesteps
        if diffusion.objective == "ddpm" and steps > num_train_timesteps:
            raise ValueError(
                f"steps={steps} is outside 1..{num_train_timesteps}: the model was trained "
                f"with T={num_train_timesteps} noise levels, so at most {num_train_timesteps} "
                "sampling steps exist."
            )
        cfg_scale = _number("cfg_scale", cfg_scale)
        if cfg_scale < 0:
            raise ValueError(
                f"cfg_scale={cfg_scale} is a negative scale; use ≥ 0: 1 means no guidance, larger "
                "values follow the prompt more closely (7.5 is usual)."
            )
        eta = _number("eta", eta)
        if eta != 0 and sampler not in STOCHASTIC_SAMPLERS:
            raise ValueError(
                f"eta={eta} only applies to sampler ddim (a ddpm model) or euler (a "
                f"flow_matching model), but sampler={sampler!r}; drop eta or switch sampler "
                "(eta=1 there is DDPM-like)."
            )
        if not 0 <= eta <= 1:
            raise ValueError(
                f"eta={eta} is outside [0, 1]: 0 gives deterministic steps, 1 the DDPM noise level."
            )
        return cls(
            sampler,
            steps,
            cfg_scale,
            eta,
            _strength(strength, image_to_image),
            _guidance_interval(guidance_interval),
        )


def _check_sampler(sampler: Any, objective: str) -> None:
    valid = SAMPLERS_BY_OBJECTIVE[objective]
    if sampler in valid:
        return
    if sampler in SAMPLERS:
        raise ValueError(
            f"sampler={sampler!r} does not fit this model, trained with diffusion.objective="
            f"{objective}; its samplers are {' | '.join(valid)}."
        )
    raise ValueError(
        f"sampler={sampler!r} is not supported; for diffusion.objective={objective} choose one "
        f"of {' | '.join(valid)}."
    )


def _strength(value: Any, image_to_image: bool) -> float:
    if value is None:
        return DEFAULT_IMG2IMG_STRENGTH if image_to_image else 1.0
    if not image_to_image:
        raise ValueError(
            f"strength={value} only applies to image-to-image: add an init image "
            "(init_image=<path>), or drop strength for text-to-image."
        )
    strength = _number("strength", value)
    if not 0 < strength < 1:
        raise ValueError(
            f"strength={strength} is outside (0, 1) for image-to-image: it is the share of the "
            "denoising chain to run. Values near 0 keep the init image almost unchanged, values "
            "near 1 redraw it; strength 1 would ignore the init image (drop init_image instead)."
        )
    return strength


def _guidance_interval(value: Any) -> GuidanceInterval | None:
    if value is None:
        return None
    usage = (
        "give null (guide at every noise level) or [low, high]: noise-to-signal ratios "
        "(EDM's σ; a flow-matching σ_flow is σ/(1 + σ)), null for an open end, e.g. [0.43, null] "
        "guides only where σ_flow > 0.3"
    )
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"guidance_interval={value!r} is not an interval; {usage}.")
    low, high = (
        default if bound is None else _number("guidance_interval", bound)
        for bound, default in zip(value, (0.0, math.inf), strict=True)
    )
    if not 0 <= low < high:
        raise ValueError(
            f"guidance_interval=[{low:g}, {high:g}] is empty or negative: it needs "
            f"0 ≤ low < high; {usage}."
        )
    return GuidanceInterval(low, high)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    return float(value)


class TextEncoderLike:
    """What the pipeline needs from a text encoder (``ldm.text.FrozenTextEncoder`` fits)."""

    def encode_hidden_states(self, prompts: Sequence[str], num_positions: int) -> Tensor: ...


class LatentDiffusionPipeline:
    """A trained U-Net, its VAE and its text encoder, put together to make images.

    ``offload=True`` keeps each model on the CPU except while it runs (for small GPUs).
    ``compile_mode`` (one of ``COMPILE_MODES``) runs the sampling loop's U-Net calls through
    ``torch.compile``; ``fixed_batch_size`` pads every smaller batch up to that size, so a
    compiled U-Net sees one shape and is traced (and CUDA-graphed) once.
    """

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: VAE,
        text_encoder: TextEncoderLike | None,
        schedule: Schedule,
        latent_normalizer: LatentNormalizer,
        latent_shape: tuple[int, int, int],
        context_length: int,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        offload: bool = False,
        compile_mode: str = "none",
        fixed_batch_size: int | None = None,
    ) -> None:
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        # Traced lazily on the first call; dynamic=False specialises on the batch shape, which
        # fixed_batch_size keeps constant. fullgraph=False lets a graph break fall back to eager.
        self.denoiser: nn.Module = (
            unet
            if compile_mode == "none"
            else torch.compile(unet, mode=compile_mode, dynamic=False, fullgraph=False)
        )
        self.fixed_batch_size = fixed_batch_size
        self.device = torch.device(device)
        self.schedule = schedule.to(device=self.device)
        self.latent_normalizer = latent_normalizer.to(self.device)  # never offloaded: tiny
        self.latent_shape = latent_shape
        self.context_length = context_length
        self.autocast_dtype = autocast_dtype
        self.offload = offload
        if not offload:
            for model in self._models():
                model.to(self.device)

    def _models(self) -> list[nn.Module]:
        models = [self.unet, self.vae]
        if isinstance(self.text_encoder, nn.Module):
            models.append(self.text_encoder)
        return models

    @contextlib.contextmanager
    def _on_device(self, model: object) -> Iterator[None]:
        """Move ``model`` to the device for the duration (only when offloading)."""
        if self.offload and isinstance(model, nn.Module):
            model.to(self.device)
            try:
                yield
            finally:
                model.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        else:
            yield

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Hidden states (B, context_length, width), truncated exactly as in training."""
        if self.text_encoder is None:
            raise RuntimeError("This pipeline was built without a text encoder")
        with self._on_device(self.text_encoder):
            hidden = self.text_encoder.encode_hidden_states(list(prompts), self.context_length)
        return hidden.to(self.device, torch.float32)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] → normalised latents (of the posterior mean), for img2img."""
        with self._on_device(self.vae):
            latents = self.vae.encode(images.to(self.device, torch.float32)).mode()
        return self.latent_normalizer.normalize(latents)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents (the U-Net's) → images in [-1, 1]."""
        latents = self.latent_normalizer.denormalize(latents.to(self.device, torch.float32))
        with self._on_device(self.vae):
            images = self.vae.decode(latents)
        return images.clamp(-1, 1)

    @torch.no_grad()
    def generate_from_context(
        self,
        context: Tensor,
        uncond_context: Tensor,
        seeds: Sequence[int],
        options: SamplingOptions,
        *,
        init_latents: Tensor | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] from text hidden states; the core of every caller."""
        count = len(seeds)
        if count != context.shape[0]:
            raise ValueError(f"Got {count} seeds for {context.shape[0]} prompts")
        uncond = uncond_context.to(self.device)
        filler = 0 if self.fixed_batch_size is None else max(0, self.fixed_batch_size - count)
        if filler:
            # A compiled U-Net keeps one batch shape (CUDA graphs replay only the recorded one):
            # fill a partial batch with copies of its last image, dropped again after sampling.
            # Each image has its own generator, so the copies change no real image.
            seeds = [*seeds, *[seeds[-1]] * filler]
            context = _repeat_last(context, filler)
            if uncond.shape[0] == count:
                uncond = _repeat_last(uncond, filler)
            if init_latents is not None:
                init_latents = _repeat_last(init_latents, filler)
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        uncond = uncond.expand_as(context)
        was_training = self.unet.training
        self.unet.eval()
        try:
            with self._on_device(self.unet), self._autocast():
                latents = sample(
                    self.denoiser,
                    self.schedule,
                    options.sampler,
                    steps=options.steps,
                    cond=context.to(self.device),
                    uncond=uncond,
                    cfg_scale=options.cfg_scale,
                    guidance_interval=options.guidance_interval,
                    eta=options.eta,
                    strength=options.strength,
                    shape=None if init_latents is not None else (len(seeds), *self.latent_shape),
                    init_latent=init_latents,
                    generator=generators,
                    progress=progress,
                )
        finally:
            self.unet.train(was_training)
        return self.decode_latents(latents[:count])

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        options: SamplingOptions,
        *,
        negative_prompts: Sequence[str] | None = None,
        init_images: Tensor | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Text (and optionally an init image) → images (B, 3, H, W) in [-1, 1]."""
        context = self.encode_prompts(prompts)
        negatives = list(negative_prompts) if negative_prompts else [""] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts")
        uncond = self.encode_prompts(negatives)
        init_latents = None
        if init_images is not None:
            init_latents = self.encode_images(init_images)
            if init_latents.shape[0] == 1 and len(prompts) > 1:
                init_latents = init_latents.expand(len(prompts), -1, -1, -1)
        return self.generate_from_context(
            context, uncond, seeds, options, init_latents=init_latents, progress=progress
        )


def _repeat_last(batch: Tensor, copies: int) -> Tensor:
    """``batch`` followed by ``copies`` copies of its last element (B + copies, ...)."""
    return torch.cat([batch, batch[-1:].expand(copies, *batch.shape[1:])])
