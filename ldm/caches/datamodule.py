"""Stage-2 data: cached VAE latents and caption hidden states as seeded, resumable loaders.

``prepare_data`` (one process under DDP: global rank 0, or each node's local rank 0 with
``prepare_data_per_node``; the others wait) checks the caches against the current VAE export,
text encoder and data config, and builds whatever is missing or stale, encoding on
``encode_device`` (that process's own device): the image index comes from
:class:`~ldm.data.datamodule.CaptionedImageDataModule`, so COCO is read one way only.
``setup`` (every process) only opens memory maps. Folder layout under ``cache.dir``, each cache
in a folder named after its key's digest (caches for other keys stay, and are reused when a run
returns to theirs)::

    {source}-{digest of data.root}/train_latents-{digest}/   ImageLatentCache (+ mirrored encodings)
                                   val_latents-{digest}/     ImageLatentCache
                                   captions-{digest}/        CaptionHiddenStateCache, both splits
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ldm.caches.caption_states import (
    CAPTION_STATES_KIND,
    CaptionHiddenStateCache,
    build_caption_hidden_state_cache,
    caption_hidden_state_key,
)
from ldm.caches.dataset import CachedLatentDataset, ResidentLatents, to_device
from ldm.caches.image_latents import (
    IMAGE_LATENTS_KIND,
    ImageLatentCache,
    build_image_latent_cache,
    image_latent_key,
    records_fingerprint,
)
from ldm.config import plain
from ldm.data.array_store import (
    CacheConfig,
    cache_is_current,
    keyed_cache_is_current,
    keyed_folder,
)
from ldm.data.batch_randomness import NO_RANDOMNESS, StepRandomness
from ldm.data.coco_index import CaptionedImage
from ldm.data.config import DataConfig
from ldm.data.datamodule import CaptionedImageDataModule, LoaderSettings
from ldm.data.dataset import batch_as_is
from ldm.data.image_cache import image_files_fingerprint
from ldm.data.resumable_datamodule import ResumableDataModule
from ldm.data.resumable_loader import ResumableDataLoader
from ldm.exports import file_fingerprint, load_vae_export, read_vae_metadata
from ldm.text import FrozenTextEncoder, TextEncoderConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


# cache.device=auto keeps the caches on the GPU when they take at most this share of its free
# memory: the rest is left to activations, the optimizer and the allocator's slack.
RESIDENT_SHARE_OF_FREE_MEMORY = 0.5


class LatentDataModule(ResumableDataModule):
    """Batches ``{"latent_mean", "latent_std": (B,C,h,w), "text_hidden_states": (B,L,W)}``
    (float16) with their ``index``/``image_id`` and the step's random tensors, from the caches
    (see :class:`~ldm.caches.dataset.CachedLatentDataset`).

    Also exposes what the U-Net module needs around them: :attr:`text_num_positions` and
    :meth:`empty_prompt_hidden_states` (the latent statistics come from the VAE export).
    """

    def __init__(
        self,
        data: DataConfig,
        loader: LoaderSettings,
        *,
        seed: int,
        cache_dir: Path,
        cache: CacheConfig,
        vae_export: Path,
        text_encoder: TextEncoderConfig,
        encode_device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.config = data
        self.loader = loader
        self.seed = seed
        self.cache = cache
        self.vae_export = Path(vae_export)
        self.text_encoder = text_encoder
        self.encode_device = torch.device(encode_device)
        # The image index only: stage 2 encodes images once, never through the image cache.
        self.images = CaptionedImageDataModule(
            dataclasses.replace(data, image_cache="off"), loader, seed=seed, cache_dir=cache_dir
        )
        self.latents: dict[str, ImageLatentCache] = {}
        self.captions: CaptionHiddenStateCache | None = None
        # What each training step draws with its batch; the training module states it.
        self.train_randomness: StepRandomness = NO_RANDOMNESS
        self.val_randomness: StepRandomness = NO_RANDOMNESS
        self._resident: dict[str, ResidentLatents] = {}

    @classmethod
    def from_config(
        cls,
        data_cfg: Any,
        cache_cfg: Any,
        text_encoder_cfg: Any,
        loader: LoaderSettings,
        *,
        seed: int,
        cache_dir: Path,
        vae_export: Path,
        encode_device: str | torch.device = "cpu",
    ) -> LatentDataModule:
        """Build from the ``data``, ``cache`` and ``text_encoder`` nodes of a Hydra config."""
        return cls(
            DataConfig.from_dict(plain(data_cfg)),
            loader,
            seed=seed,
            cache_dir=cache_dir,
            cache=CacheConfig.from_dict(plain(cache_cfg)),
            vae_export=vae_export,
            text_encoder=TextEncoderConfig.from_dict(plain(text_encoder_cfg)),
            encode_device=encode_device,
        )

    # ---- where the caches live and what they must match --------------------------------

    @cached_property
    def folder(self) -> Path:
        """This dataset's cache folder: caches of different datasets never overwrite each other."""
        digest = hashlib.sha1(str(self.config.root.resolve()).encode()).hexdigest()[:10]
        return self.cache.dir / f"{self.config.source}-{digest}"

    @cached_property
    def vae_metadata(self) -> dict[str, Any]:
        """The VAE export's JSON (weights fingerprint, latent statistics), read without
        loading the weights: enough to validate a cache."""
        return read_vae_metadata(self.vae_export)

    def _data_key(self, split: str, records: list[CaptionedImage]) -> dict[str, Any]:
        """The data config one split's caches depend on, with the annotation file's hash so an
        edited or regenerated file is noticed even when every path stays the same, and the
        fingerprint of the records that passed the bad-input check."""
        config = self.config
        own_val = split == "val" and config.val is not None
        files = config.val if own_val else config.train
        key = {
            "source": config.source,
            "root": str(config.root.resolve()),
            "split": split,
            "annotations": str(files.annotations.resolve()),
            "annotations_sha256": file_fingerprint(files.annotations),
            "images": str(files.images.resolve()),
            "image_size": config.image_size,
            "subset": config.val_subset if own_val else config.subset,
            "records_sha256": records_fingerprint(records),
        }
        if config.val is None:  # the split is a seeded hold-out of the training images
            key["holdout"] = {"val_fraction": config.val_fraction, "seed": self.seed}
        return key

    @cached_property
    def _wanted(self) -> dict[tuple[str, str], tuple[Path, dict[str, Any]]]:
        """(split or "all", kind) → (folder, key) of every cache this run needs.

        The latent keys cover each image file's size and modification time, so the image index
        is read first (its check results are cached: no image is decoded again).
        """
        self.images.setup()
        records = {"train": self.images.train_records, "val": self.images.val_records}
        data_keys = {split: self._data_key(split, records[split]) for split in SPLITS}
        vae_sha = self.vae_metadata["weights_sha256"]
        wanted = {}
        for split in SPLITS:
            key = image_latent_key(
                vae_sha,
                data_keys[split],
                self.config.hflip and split == "train",
                image_files_fingerprint(records[split]),
            )
            wanted[split, IMAGE_LATENTS_KIND] = (
                keyed_folder(self.folder, f"{split}_latents", key),
                key,
            )
        key = caption_hidden_state_key(
            self.text_encoder.fingerprint(), data_keys, self.cache.text_max_positions
        )
        wanted["all", CAPTION_STATES_KIND] = (keyed_folder(self.folder, "captions", key), key)
        return wanted

    # ---- Lightning hooks ----------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build every missing or stale cache (or refuse, under ``cache.policy=error``)."""
        self.images.generate_source()
        todo = [
            (split, kind)
            for (split, kind), (folder, key) in self._wanted.items()
            if not keyed_cache_is_current(folder, kind, key, self.cache.policy)
        ]
        if not todo:
            log.info("Latent caches under %s are current", self.folder)
            return
        records = {"train": self.images.train_records, "val": self.images.val_records}
        for split, kind in todo:
            folder, key = self._wanted[split, kind]
            log.info("Building the %s cache at %s", kind, folder)
            if kind == IMAGE_LATENTS_KIND:
                self._build_latents(records[split], folder, key)
            else:
                self._build_captions(records, folder, key)

    def _build_latents(self, records: list[CaptionedImage], folder: Path, key: dict) -> None:
        vae, _ = load_vae_export(self.vae_export)
        build_image_latent_cache(
            folder,
            records,
            vae,
            key=key,
            image_size_px=self.config.image_size,
            hflip=key["hflip"],
            batch_size=self.cache.batch_size,
            num_workers=self.loader.num_workers,
            device=self.encode_device,
        )

    def _build_captions(
        self, records: dict[str, list[CaptionedImage]], folder: Path, key: dict
    ) -> None:
        encoder = FrozenTextEncoder(self.text_encoder).to(self.encode_device)
        build_caption_hidden_state_cache(
            folder,
            records,
            encoder,
            key=key,
            max_positions=self.cache.text_max_positions,
            batch_size=self.cache.batch_size,
        )

    def setup(self, stage: str | None = None) -> None:
        """Open the caches prepared by :meth:`prepare_data`, refusing stale or mismatched ones."""
        if self.captions is not None:
            return
        for (_, kind), (folder, key) in self._wanted.items():
            if not cache_is_current(folder, kind, key, policy="error"):
                raise FileNotFoundError(
                    f"No {kind} cache at {folder}. Call prepare_data() first (Lightning's "
                    "Trainer.fit does), which builds it. In a run over several nodes whose "
                    "paths.cache_dir is local to each node, set trainer.prepare_data_per_node=true "
                    "so that every node builds its own."
                )
        self.captions = CaptionHiddenStateCache.open(self._wanted["all", CAPTION_STATES_KIND][0])
        for split in SPLITS:
            latents = ImageLatentCache.open(self._wanted[split, IMAGE_LATENTS_KIND][0])
            expected = self.captions.metadata["splits"][split]["records_sha256"]
            if latents.metadata["records_sha256"] != expected:
                raise ValueError(
                    f"The {split} latent cache at {latents.folder} and the caption cache at "
                    f"{self.captions.folder} were built from different image lists. Delete "
                    f"{self.folder} and run again to rebuild both."
                )
            self.latents[split] = latents
        log.info(
            "Latent caches: %d training and %d validation images, captions cut to %d tokens",
            len(self.latents["train"]),
            len(self.latents["val"]),
            self.text_num_positions,
        )

    # ---- what the U-Net module reads ----------------------------------------------------

    @property
    def text_num_positions(self) -> int:
        """Token positions of every cached caption; encode sampling prompts to this length
        (``FrozenTextEncoder.encode_hidden_states(prompts, text_num_positions)``)."""
        return self._opened_captions().num_positions

    def empty_prompt_hidden_states(self) -> torch.Tensor:
        """(1, L, W) float32 hidden states of the empty prompt, as cached, for condition
        dropout and classifier-free guidance."""
        return torch.from_numpy(self._opened_captions().empty_prompt.astype("float32"))[None]

    def _opened_captions(self) -> CaptionHiddenStateCache:
        if self.captions is None:
            raise RuntimeError("Call prepare_data() and setup() before reading cache properties.")
        return self.captions

    # ---- loaders --------------------------------------------------------------------------

    def _dataset(self, split: str) -> CachedLatentDataset:
        captions = self._opened_captions().split(split)
        train = split == "train"
        return CachedLatentDataset(
            self.latents[split],
            captions,
            train=train,
            randomness=self.train_randomness if train else self.val_randomness,
            gather_on_host=self.resident_device is None,
        )

    def _common_loader_args(self) -> dict[str, Any]:
        # The datasets batch in __getitems__ (one gather per array), so collation is a no-op.
        return {**self.loader.dataloader_args(self.config.batch_size), "collate_fn": batch_as_is}

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = self._dataset("train")
        return self.resumable_train_loader(dataset, seed=self.seed, **self._common_loader_args())

    def val_dataloader(self) -> DataLoader:
        """This process's shard of the validation latents, in order."""
        return self.evaluation_loader(self._dataset("val"), **self._common_loader_args())

    # ---- caches resident on the GPU -----------------------------------------------------

    @cached_property
    def resident_device(self) -> torch.device | None:
        """Where batches are gathered when not on the host: the training GPU, or None."""
        choice = self.cache.device
        if choice == "cpu" or (choice == "auto" and self.encode_device.type != "cuda"):
            return None
        if not torch.cuda.is_available():
            raise ValueError(
                "cache.device=cuda keeps the caches in GPU memory, but no CUDA GPU is visible. "
                "Use cache.device=auto or cache.device=cpu."
            )
        device = self.encode_device if self.encode_device.type == "cuda" else torch.device("cuda")
        needed = self._opened_captions().hidden_states.nbytes + sum(
            self.latents[split].mean.nbytes + self.latents[split].std.nbytes for split in SPLITS
        )
        free, _ = torch.cuda.mem_get_info(device)
        if choice == "auto" and needed > RESIDENT_SHARE_OF_FREE_MEMORY * free:
            log.info(
                "The caches (%.1f GiB) exceed half the GPU's free memory: gathering batches on "
                "the host instead (cache.device=cuda forces the GPU).",
                needed / 2**30,
            )
            return None
        log.info("Keeping the caches (%.2f GiB) in %s memory", needed / 2**30, device)
        return device

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Gather latents and text states on the GPU when the caches live there."""
        if "split" not in batch:
            return batch
        split = batch.pop("split")
        if split not in self._resident:
            text = (
                next(iter(self._resident.values())).hidden_states
                if self._resident
                else to_device(self._opened_captions().hidden_states, self.resident_device)
            )
            self._resident[split] = ResidentLatents.upload(self.latents[split], text)
        return batch | self._resident[split].gather(batch)
