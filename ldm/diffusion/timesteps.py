"""Which of the T training timesteps a sampler visits, and where img2img enters the chain."""

from __future__ import annotations

from fractions import Fraction
from typing import TypeVar

import torch
from torch import Tensor

# A descending grid of noise levels: a tensor or a list of timesteps t, or a list of σ.
Levels = TypeVar("Levels", Tensor, list[int], list[float])


def sampling_timesteps(num_train_timesteps: int, steps: int) -> Tensor:
    """``steps`` descending timesteps, evenly spaced and always starting at T - 1.

    This is the "trailing" spacing of Lin et al. 2023 (diffusers ``timestep_spacing="trailing"``):
    t_i = round((steps - i)·T/steps) - 1. Starting at T - 1 means the first model call sees the
    noise level sampling actually starts from; "leading" spacing would start at T - T/steps and
    hand the model pure noise labelled as a partly clean latent.

    diffusers computes the same grid with a floating-point ``arange``, which for a few counts
    (e.g. T=200 with 29, 31 or 48 steps) yields one step too many or rounds a tie the other way;
    for every other count the grids are identical. ``steps`` is an int in 1..T (checked where
    it entered, by ``SamplingOptions.checked``).
    """
    # Exact rational arithmetic; Fraction rounds halves to even, like NumPy (12.5 → 12).
    return torch.tensor(
        [round(Fraction(num_train_timesteps * k, steps)) - 1 for k in range(steps, 0, -1)],
        dtype=torch.long,
    )


def timesteps_for_strength(timesteps: Levels, strength: float) -> Levels:
    """The tail of ``timesteps`` that img2img runs: the last round(strength·steps), at least one.

    strength = 1 keeps every step (the start latent is fully noised at T - 1, or σ = 1);
    strength = 0.3 noises the start latent only to the level of the step 70% of the way down
    the chain. The same rule serves a ddpm grid of t and a flow-matching grid of σ.
    """
    kept = max(1, round(strength * len(timesteps)))
    return timesteps[len(timesteps) - kept :]
