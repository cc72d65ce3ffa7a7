"""The frozen text encoder's hidden states for every caption, computed once before stage 2.

Encoding 32 prompts with the ViT-B-32 text tower costs about as much on a CPU as a whole U-Net
step, so training reads them from here instead. Two things keep the cache small and exact:

* Only the first ``num_positions`` token positions are kept — the longest caption's token count,
  capped by ``cache.text_max_positions``. CLIP's text transformer is causal, so these equal the
  first positions of a full 77-token encoding; sampling reproduces them by encoding prompts with
  the same ``num_positions`` (stored in ``cache.json``). Captions longer than that lose their
  tail, exactly as an over-long prompt would at sampling.
* Identical captions are stored once, across splits (each split's ``caption_rows`` maps its
  captions to rows); the synthetic demo set repeats almost half of its captions.

One cache covers all splits, so training, validation and sampling share one ``num_positions``.
Layout (U distinct captions, L positions, W width; per split N images, M captions):
``hidden_states.npy`` (U, L, W) float16; ``empty_prompt.npy`` (L, W) float16, the unconditional
embedding for classifier-free guidance; ``{split}_caption_rows.npy`` (M,) int64 and
``{split}_caption_offsets.npy`` (N+1,) int64 — image i's captions are the rows
``caption_rows[offsets[i]:offsets[i+1]]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ldm.caches.image_latents import STAGE2_BUILD_HINT, records_fingerprint
from ldm.data.array_store import building_cache, open_array, open_complete_cache
from ldm.data.coco_index import CaptionedImage
from ldm.text.encoder import FrozenTextEncoder

log = logging.getLogger(__name__)

CAPTION_STATES_KIND = "caption_hidden_states"


def caption_hidden_state_key(
    text_encoder_fingerprint: dict[str, Any],
    data_keys: dict[str, dict[str, Any]],
    max_positions: int | None,
) -> dict[str, Any]:
    """Everything the cached hidden states depend on; the cache is rebuilt when any changes."""
    return {
        "text_encoder": text_encoder_fingerprint,
        "data": data_keys,
        "max_positions": max_positions,
    }


@dataclass(frozen=True)
class SplitCaptionStates:
    """One split's view of the cache: which stored row holds each image's captions."""

    folder: Path
    split: str
    hidden_states: np.ndarray  # (U, L, W) float16, shared by all splits
    caption_rows: np.ndarray  # (M,) int64
    caption_offsets: np.ndarray  # (N + 1,) int64

    def __reduce__(self) -> tuple:
        """Pickle as (folder, split) so DataLoader workers reopen the memory maps."""
        return (_open_split, (self.folder, self.split))

    def __len__(self) -> int:
        """Number of images."""
        return int(self.caption_offsets.shape[0]) - 1

    def num_captions(self, image_index: int) -> int:
        offsets = self.caption_offsets
        return int(offsets[image_index + 1] - offsets[image_index])

    def hidden_states_for(self, image_index: int, caption_index: int) -> np.ndarray:
        """(L, W) float16 hidden states of one image's ``caption_index``-th caption."""
        row = self.caption_rows[int(self.caption_offsets[image_index]) + caption_index]
        return self.hidden_states[int(row)]


@dataclass(frozen=True)
class CaptionHiddenStateCache:
    """An opened caption cache covering every split; the arrays are read-only memory maps."""

    folder: Path
    metadata: dict[str, Any]
    hidden_states: np.ndarray  # (U, L, W) float16
    empty_prompt: np.ndarray  # (L, W) float16

    @classmethod
    def open(cls, folder: Path) -> CaptionHiddenStateCache:
        arrays = ("hidden_states", "empty_prompt")
        return cls(**open_complete_cache(folder, CAPTION_STATES_KIND, STAGE2_BUILD_HINT, arrays))

    @property
    def num_positions(self) -> int:
        """Token positions kept per caption; sampling must encode prompts to this length."""
        return int(self.hidden_states.shape[1])

    @property
    def width(self) -> int:
        return int(self.hidden_states.shape[2])

    def split(self, name: str) -> SplitCaptionStates:
        if name not in self.metadata["splits"]:
            raise KeyError(f"The caption cache at {self.folder} has no split {name!r}")
        return SplitCaptionStates(
            folder=self.folder,
            split=name,
            hidden_states=self.hidden_states,
            caption_rows=open_array(self.folder, f"{name}_caption_rows.npy"),
            caption_offsets=open_array(self.folder, f"{name}_caption_offsets.npy"),
        )


def _open_split(folder: Path, split: str) -> SplitCaptionStates:
    return CaptionHiddenStateCache.open(folder).split(split)


def build_caption_hidden_state_cache(
    folder: Path,
    splits: dict[str, Sequence[CaptionedImage]],
    encoder: FrozenTextEncoder,
    *,
    key: dict[str, Any],
    max_positions: int | None,
    batch_size: int,
) -> CaptionHiddenStateCache:
    """Encode every caption of every split (each distinct text once) into a cache at ``folder``."""
    splits = {name: list(records) for name, records in splits.items()}
    rows: dict[str, int] = {}
    split_rows = {
        name: [rows.setdefault(c, len(rows)) for r in records for c in r.captions]
        for name, records in splits.items()
    }
    unique = list(rows)
    token_counts = [
        encoder.token_count(caption)
        for caption in tqdm(unique, desc="Tokenizing captions", dynamic_ncols=True)
    ]
    longest = max(token_counts)
    num_positions = min(longest, max_positions or encoder.max_length, encoder.max_length)
    truncated = sum(count > num_positions for count in token_counts)
    if truncated:
        log.info(
            "%d of %d distinct captions are longer than the %d cached token positions "
            "(cache.text_max_positions) and lose their tail.",
            truncated,
            len(unique),
            num_positions,
        )
    started = time.perf_counter()
    with building_cache(folder) as writer:
        hidden = writer.new_array(
            "hidden_states.npy", (len(unique), num_positions, encoder.width), np.float16
        )
        starts = range(0, len(unique), batch_size)
        for start in tqdm(starts, desc="Encoding captions", dynamic_ncols=True):
            batch = unique[start : start + batch_size]
            states = encoder.encode_hidden_states(batch, num_positions)  # (B, L, W)
            hidden[start : start + len(batch)] = states.half().cpu().numpy()
        empty = writer.new_array("empty_prompt.npy", (num_positions, encoder.width), np.float16)
        empty[:] = encoder.encode_hidden_states([""], num_positions)[0].half().cpu().numpy()
        for name, records in splits.items():
            caption_rows = split_rows[name]
            offsets = [0, *accumulate(len(record.captions) for record in records)]
            writer.new_array(f"{name}_caption_rows.npy", (len(caption_rows),), np.int64)[:] = (
                caption_rows
            )
            writer.new_array(f"{name}_caption_offsets.npy", (len(offsets),), np.int64)[:] = offsets
        writer.finish(
            CAPTION_STATES_KIND,
            key,
            {
                "num_positions": num_positions,
                "width": encoder.width,
                "dtype": "float16",
                "splits": {
                    name: {
                        "count_images": len(records),
                        "count_captions": len(split_rows[name]),
                        "records_sha256": records_fingerprint(records),
                    }
                    for name, records in splits.items()
                },
                "count_distinct_captions": len(unique),
                "longest_caption_tokens": longest,
                "truncated_captions": truncated,
                "encode_seconds": round(time.perf_counter() - started, 2),
            },
        )
    return CaptionHiddenStateCache.open(folder)
