"""Gaussian noise from one generator, or one generator per batch element.

With a generator per image, each image depends only on its own seed: the same seed gives the
same picture whether it is sampled alone or in a batch of 64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None


def standard_normal(
    shape: Sequence[int], generator: Generators, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """N(0, I) of ``shape``; a sequence of generators draws batch element i from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(
            f"Got {len(generator)} generators for a batch of {shape[0]}: give one per image."
        )
    return torch.stack(
        [torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator]
    )
