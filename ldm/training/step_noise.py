"""Training randomness as a pure function of where the run is, so resuming repeats it exactly.

Lightning restores weights, optimizer and LR schedule from a checkpoint (and our data module
restores the data order), but not the global random generators behind the posterior samples,
diffusion timesteps and noise, and condition dropout. Drawing them instead from a generator
seeded by (run seed, epoch, batch, rank) makes a run resumed from any checkpoint — mid-epoch
included — train on exactly the numbers the uninterrupted run used, without storing generator
states, and gives every rank its own noise under DDP.

The generator lives on the CPU: the draws are latent-sized (tiny next to a training step), and
the same seed then gives the same noise on CUDA, MPS and CPU.
"""

from __future__ import annotations

import numpy as np
import torch


def step_generator(seed: int, epoch: int, batch_idx: int, rank: int) -> torch.Generator:
    """A CPU generator for one training batch; SeedSequence decorrelates neighbouring keys."""
    state = np.random.SeedSequence([seed, epoch, batch_idx, rank]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & (2**63 - 1))


def normal_like(reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ε ~ N(0, I) shaped, typed and placed like ``reference``, drawn from ``generator``."""
    noise = torch.randn(reference.shape, generator=generator, dtype=torch.float32)
    return noise.to(device=reference.device, dtype=reference.dtype)
