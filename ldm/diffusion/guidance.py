"""Classifier-free guidance (Ho & Salimans 2022): push predictions away from the unconditional,
optionally only over an interval of noise levels (Kynkäänniemi et al. 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser


@dataclass(frozen=True)
class GuidanceInterval:
    """Guide only at noise levels in (low, high], elsewhere use the conditional prediction alone.

    Levels are noise-to-signal ratios (EDM's σ, ``schedule.noise_to_signal``), which mean the
    same for a ddpm and a flow-matching model: flow matching's σ_flow is σ/(1 + σ). Guidance at
    the highest levels mostly narrows the variety of layouts; at the lowest it sharpens
    detail the prompt cannot tell apart and costs a second model call per step. Kynkäänniemi
    et al. guide EDM2 on (0.28, 5.42]; README "Guidance interval" has what it does here.
    """

    low: float = 0.0
    high: float = math.inf

    def applies(self, noise_to_signal: float) -> bool:
        return self.low < noise_to_signal <= self.high

    def __str__(self) -> str:
        return f"({self.low:g}, {'∞' if math.isinf(self.high) else f'{self.high:g}'}]"

    def as_config(self) -> list[float | None]:
        """[low, high] as the ``guidance_interval`` key takes it (None: no upper end)."""
        return [self.low, None if math.isinf(self.high) else self.high]


def guided_prediction(
    model: Denoiser,
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    uncond: Tensor | None = None,
    cfg_scale: float = 1.0,
) -> Tensor:
    """out = out_u + s·(out_c - out_u), both branches in one model call of batch 2B.

    ``uncond`` is the null-prompt (or negative-prompt) conditioning, shaped like ``cond``.
    At s = 1 the formula is just the conditional prediction, so the model runs once on batch B
    and ``uncond`` is not needed. Guiding the raw ε or v output is the same as guiding x0:
    each is affine in the others at fixed x_t.
    """
    if cfg_scale == 1:
        return model(x_t, t, cond)
    if uncond is None:
        raise ValueError(
            f"cfg_scale={cfg_scale} needs the unconditional embedding: pass uncond (the empty or "
            "negative prompt's conditioning), or use cfg_scale=1 for no guidance."
        )
    if not isinstance(cond, Tensor) or cond.shape != uncond.shape:
        found = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise ValueError(
            f"guidance batches cond and uncond together, so they must be tensors of one shape; "
            f"got cond {found} and uncond {tuple(uncond.shape)}. Expand uncond to cond's shape."
        )
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
    unconditional, conditional = both.chunk(2)
    return unconditional + cfg_scale * (conditional - unconditional)
