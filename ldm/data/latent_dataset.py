"""Stage-2 training items read from the latent and caption caches, no image or text model run."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.dataset import ItemKey
from ldm.data.latent_cache import ImageLatentCache
from ldm.data.latent_text_cache import SplitCaptionStates


def choose_caption_and_flip(
    seed: int | None, num_captions: int, can_flip: bool
) -> tuple[int, bool]:
    """One random caption and flip decision, drawn in the same order as
    :class:`~ldm.data.dataset.CaptionedImageDataset`, so a given item seed picks the same
    caption and flip whether stage 2 reads images or cached latents."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    caption_index = int(torch.randint(num_captions, (1,), generator=generator))
    flip = bool(torch.rand(1, generator=generator) < 0.5) if can_flip else False
    return caption_index, flip


class CachedLatentDataset(Dataset):
    """Yields ``{"latent_mean", "latent_std": (C,h,w) float32, "text_hidden_states": (L,W)
    float32, "caption": str, "image_id": int}``.

    Training draws one caption and (when the cache holds mirrored encodings) one flip per item,
    seeded by the sampler's item seed so resumed runs repeat them exactly; evaluation takes the
    first caption, unflipped. The U-Net module draws z = μ + σ·ε and applies the scale factor.
    """

    def __init__(
        self, latents: ImageLatentCache, captions: SplitCaptionStates, *, train: bool
    ) -> None:
        if len(latents) != len(captions):
            raise ValueError(
                f"The latent cache at {latents.folder} holds {len(latents)} images but the "
                f"caption cache at {captions.folder} has {len(captions)} for split "
                f"{captions.split!r}; delete both folders and rebuild them."
            )
        self.latents = latents
        self.captions = captions
        self.train = train

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        num_captions = self.captions.num_captions(index)
        caption_index, flip = (
            choose_caption_and_flip(seed, num_captions, self.latents.has_flipped)
            if self.train
            else (0, False)
        )
        variant = int(flip)
        return {
            "latent_mean": _float_tensor(self.latents.mean[index, variant]),
            "latent_std": _float_tensor(self.latents.std[index, variant]),
            "text_hidden_states": _float_tensor(
                self.captions.hidden_states_for(index, caption_index)
            ),
            "caption": self.latents.captions[index][caption_index],
            "image_id": int(self.latents.image_ids[index]),
        }


def _float_tensor(array: np.ndarray) -> torch.Tensor:
    """Copy a float16 memory-mapped slice into a float32 tensor (the map stays read-only)."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32))
