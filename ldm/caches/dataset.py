"""Stage-2 batches gathered from the latent and caption caches: one indexing operation per array.

A batch is chosen on the CPU — which images, which caption of each, mirrored or not, and the
step's random tensors — as a handful of small integer tensors. The latents and text states are
then gathered either right there from the memory-mapped caches (``cache.device=cpu``), or after
the indices reach the GPU, from copies of the caches resident in GPU memory
(``cache.device=cuda``), which is what lets a small U-Net train at tens of thousands of latents
per second. Either way, they stay float16 until the training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ldm.caches.caption_states import SplitCaptionStates
from ldm.caches.image_latents import ImageLatentCache
from ldm.data.batch_randomness import NO_RANDOMNESS, ItemKey, StepRandomness, draw_batch_choices

GATHERED_KEYS = ("latent_mean", "latent_std", "text_hidden_states")


@dataclass(frozen=True)
class ResidentLatents:
    """One split's latents and the shared caption states as device tensors (float16)."""

    mean: Tensor  # (N, V, C, h, w)
    std: Tensor  # (N, V, C, h, w)
    hidden_states: Tensor  # (U, L, W)

    @classmethod
    def upload(cls, latents: ImageLatentCache, hidden_states: Tensor) -> ResidentLatents:
        """Copy one split's latents next to ``hidden_states`` (already on the device)."""
        device = hidden_states.device
        return cls(to_device(latents.mean, device), to_device(latents.std, device), hidden_states)

    def gather(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The batch's float16 latents and text states, gathered where these tensors live."""
        index, variant = batch["index"], batch["variant"]
        return {
            "latent_mean": self.mean[index, variant],
            "latent_std": self.std[index, variant],
            "text_hidden_states": self.hidden_states[batch["caption_row"]],
        }


def to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A whole memory-mapped cache array as one device tensor."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


class CachedLatentDataset(Dataset):
    """Batches ``{"index", "variant", "caption_row", "image_id": (B,) int64}`` plus, when
    ``gather_on_host``, ``{"latent_mean", "latent_std": (B,C,h,w), "text_hidden_states":
    (B,L,W)}`` float16, plus the step's random tensors (``randomness``); validation batches
    also carry their ``caption`` strings (for sample grids), and batches to be gathered on the
    device their ``split`` name.

    Training draws one caption and (when the cache holds mirrored encodings) one flip per image
    from the batch's generator, so resumed runs repeat them exactly; evaluation takes the first
    caption, unflipped. The U-Net module draws z = μ + σ·ε from the batch and applies the scale.
    """

    def __init__(
        self,
        latents: ImageLatentCache,
        captions: SplitCaptionStates,
        *,
        train: bool,
        randomness: StepRandomness = NO_RANDOMNESS,
        gather_on_host: bool = True,
    ) -> None:
        if len(latents) != len(captions):
            raise ValueError(
                f"The latent cache at {latents.folder} holds {len(latents)} images but the "
                f"caption cache at {captions.folder} has {len(captions)} for split "
                f"{captions.split!r}; delete both folders and rebuild them."
            )
        self.latents = latents
        self.captions = captions
        self.num_captions = torch.from_numpy(np.diff(captions.caption_offsets))  # (N,)
        self.train = train
        self.randomness = randomness
        self.gather_on_host = gather_on_host

    def __len__(self) -> int:
        return len(self.latents)

    def __getitems__(self, keys: Sequence[ItemKey]) -> dict[str, Any]:
        choices = draw_batch_choices(
            keys, self.num_captions, can_flip=self.latents.has_flipped, train=self.train
        )
        index = choices.index.numpy()
        first_caption = self.captions.caption_offsets[index]
        caption_row = self.captions.caption_rows[first_caption + choices.caption_index.numpy()]
        batch: dict[str, Any] = {
            "index": torch.from_numpy(index),
            "variant": choices.flip.long(),
            "caption_row": torch.from_numpy(np.asarray(caption_row, dtype=np.int64)),
            "image_id": torch.from_numpy(np.asarray(self.latents.image_ids[index])),
        }
        if self.gather_on_host:
            batch |= self._gather_on_host(index, choices.flip.numpy(), caption_row)
        else:  # gathered after the transfer, from this split's resident copy
            batch["split"] = self.captions.split
        if not self.train:
            batch["caption"] = [
                self.latents.captions[i][c]
                for i, c in zip(index.tolist(), choices.caption_index.tolist(), strict=True)
            ]
        return batch | self.randomness.draw(len(keys), choices.generator)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        """One item, as the batch of one it belongs to (for inspection and tests)."""
        batch = self.__getitems__([key])
        return {name: value[0] for name, value in batch.items()}

    def _gather_on_host(
        self, index: np.ndarray, flip: np.ndarray, caption_row: np.ndarray
    ) -> dict[str, Tensor]:
        variant = flip.astype(np.int64)
        return {
            "latent_mean": torch.from_numpy(self.latents.mean[index, variant]),
            "latent_std": torch.from_numpy(self.latents.std[index, variant]),
            "text_hidden_states": torch.from_numpy(self.captions.hidden_states[caption_row]),
        }
