"""A training step's random numbers, drawn on the CPU with its batch while the GPU is busy.

Every random choice of a step (which caption, whether to flip, the posterior sample, the
diffusion timestep and noise, condition dropout) comes from one generator per batch, seeded by
the batch's item keys. The sampler derives those keys from (run seed, epoch, position, rank),
so a run resumed mid-epoch draws exactly the numbers the uninterrupted run drew, every rank
draws its own, and the same seed gives the same numbers on CUDA, MPS and CPU — with no
generator state to checkpoint.

Why here and not in the training step: drawn in the loader (a worker process where there are
workers), the numbers travel with the batch — pinned and copied without blocking — so the step
itself creates no generator, makes no host→device copy of its own and has static inputs that
``torch.compile`` and CUDA graphs can take whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# A sampler hands datasets either plain indices (evaluation) or (index, item seed) pairs.
ItemKey = int | tuple[int, int]

# Entropy tag for keys without item seeds (evaluation), so they never collide with training.
_EVALUATION_TAG = 0x5EED_E7A1


def batch_generator(keys: Sequence[ItemKey]) -> torch.Generator:
    """A CPU generator that depends only on the batch's keys (SeedSequence mixes them well)."""
    if keys and isinstance(keys[0], tuple):
        entropy = [seed for _, seed in keys]
    else:
        entropy = [_EVALUATION_TAG, *(int(key) for key in keys)]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & (2**63 - 1))


@dataclass(frozen=True)
class BatchChoices:
    """What a batch's keys decide before anything is read: the items, one caption of each,
    mirrored or not, and the generator the step's random tensors are drawn from next."""

    index: Tensor  # (B,) int64 dataset indices
    caption_index: Tensor  # (B,) int64, within each image's own captions
    flip: Tensor  # (B,) bool
    generator: torch.Generator


def draw_batch_choices(
    keys: Sequence[ItemKey], num_captions: Tensor, *, can_flip: bool, train: bool
) -> BatchChoices:
    """One caption per image (uniform among its own; ``num_captions`` (N,) counts every item's)
    and a coin-flip mirror; evaluation takes the first caption, never mirrored. Drawn first
    from the batch's generator, so the image and latent paths agree."""
    generator = batch_generator(keys)
    index = torch.tensor([key[0] if isinstance(key, tuple) else key for key in keys])
    batch = index.shape[0]
    if not train:
        unchosen = torch.zeros(batch, dtype=torch.long)
        return BatchChoices(index, unchosen, torch.zeros(batch, dtype=bool), generator)
    counts = num_captions[index]
    uniform = torch.rand(batch, generator=generator, dtype=torch.float64)
    caption_index = (uniform * counts).long().clamp_(max=counts - 1)
    flips = torch.rand(batch, generator=generator) < 0.5
    return BatchChoices(index, caption_index, flips & can_flip, generator)


@dataclass(frozen=True)
class StepRandomness:
    """Which random tensors one step needs; the training module states it, the loader draws it.

    ``posterior_noise_shape``: ε for z = μ + σ·ε (per image: (C, h, w)). ``num_timesteps``:
    t ~ U{0..T-1} (the ddpm objective); ``timestep_normals``: instead, n ~ N(0, 1) per image,
    which flow matching turns into its logit-normal σ. ``diffusion_noise_shape``: ε shaped like
    the latent. ``cond_dropout``: the share of captions replaced by the empty prompt (a (B,)
    bool mask; null: no mask). ``offset_noise_shape`` ((C, 1, 1)) and
    ``perturbation_noise_shape`` (the latent's): the standard-normal draws of the noise offset
    and input perturbation options, scaled where they are used (``ldm.diffusion.training_noise``).
    """

    posterior_noise_shape: tuple[int, ...] | None = None
    num_timesteps: int | None = None
    timestep_normals: bool = False
    diffusion_noise_shape: tuple[int, ...] | None = None
    cond_dropout: float | None = None
    offset_noise_shape: tuple[int, ...] | None = None
    perturbation_noise_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_timesteps is not None and self.timestep_normals:
            raise ValueError(
                "a step draws its noise levels one way: num_timesteps (ddpm) or "
                "timestep_normals (flow matching), not both."
            )

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The tensors, always drawn in the same order so a key gives the same numbers. The
        options added later draw last, so that with them off every earlier draw is unchanged."""
        drawn: dict[str, Tensor] = {}
        if self.posterior_noise_shape is not None:
            drawn["posterior_noise"] = torch.randn(
                (batch_size, *self.posterior_noise_shape), generator=generator
            )
        if self.num_timesteps is not None:
            drawn["timesteps"] = torch.randint(
                self.num_timesteps, (batch_size,), generator=generator
            )
        if self.timestep_normals:
            drawn["timestep_normals"] = torch.randn(batch_size, generator=generator)
        if self.diffusion_noise_shape is not None:
            drawn["diffusion_noise"] = torch.randn(
                (batch_size, *self.diffusion_noise_shape), generator=generator
            )
        if self.cond_dropout is not None:
            drawn["drop_condition"] = (
                torch.rand(batch_size, generator=generator) < self.cond_dropout
            )
        if self.offset_noise_shape is not None:
            drawn["offset_noise"] = torch.randn(
                (batch_size, *self.offset_noise_shape), generator=generator
            )
        if self.perturbation_noise_shape is not None:
            drawn["perturbation_noise"] = torch.randn(
                (batch_size, *self.perturbation_noise_shape), generator=generator
            )
        return drawn


NO_RANDOMNESS = StepRandomness()
