"""Seeded shuffling whose position inside an epoch is saved in checkpoints and restored.

:class:`ResumableSampler` draws each epoch's order and per-item seeds from (seed, epoch), so
:class:`ResumableDataLoader` only has to count the batches it handed out to continue a run
mid-epoch with exactly the batches (and, through the item seeds, the augmentations) that an
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

_SEED_RANGE = 2**62


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, item_seed)`` pairs: a seeded per-epoch permutation, sharded across ranks.

    Each rank takes every ``num_replicas``-th index of the shared permutation (the tail is
    dropped so every rank gets the same count), which is why Lightning's own distributed
    sampler must stay off (``use_distributed_sampler=False`` in the trainer config).
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas or (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.dataset_size = dataset_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._resume_epoch: int | None = None
        self._resume_position = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start."""
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        """Skip the first ``position`` items the next time epoch ``epoch`` is iterated."""
        self._resume_epoch, self._resume_position = epoch, position

    def __len__(self) -> int:
        return self.dataset_size // self.num_replicas

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        item_seeds = torch.randint(_SEED_RANGE, (self.dataset_size,), generator=generator)
        order = order[: len(self) * self.num_replicas][self.rank :: self.num_replicas]
        start = self._resume_position if self._resume_epoch == self.epoch else 0
        self._resume_epoch, self._resume_position = None, 0
        for index in order[start:].tolist():
            yield index, int(item_seeds[index])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that counts the batches it handed out."""

    sampler: ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableDataLoader needs sampler=ResumableSampler(...)")
        self._batches_served = 0

    def __iter__(self) -> Iterator[Any]:
        restored = (
            self.sampler._resume_position if self.sampler._resume_epoch == self.sampler.epoch else 0
        )
        self._batches_served = restored // (self.batch_size or 1)
        for batch in super().__iter__():
            self._batches_served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where this loader stands: the epoch and how many batches it has handed out (each
        process has handed out as many as the others)."""
        return {
            "epoch": self.sampler.epoch,
            "batches_served": self._batches_served,
            "batch_size": int(self.batch_size or 1),
            "seed": self.sampler.seed,
            "num_replicas": self.sampler.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`; the batch size, seed and process count must match."""
        if state["batch_size"] != self.batch_size or state["seed"] != self.sampler.seed:
            raise ValueError(
                "Cannot resume the data order: the checkpoint was written with batch_size="
                f"{state['batch_size']} and seed={state['seed']}, this run has batch_size="
                f"{self.batch_size} and seed={self.sampler.seed}. Use the same data.batch_size and "
                "seed to resume, or start a new run."
            )
        written_by = state.get("num_replicas", 1)  # checkpoints from before DDP: one process
        if written_by != self.sampler.num_replicas:
            raise ValueError(
                f"Cannot resume the data order: the checkpoint was written by {written_by} "
                f"training process(es), this run has {self.sampler.num_replicas}, and each "
                "process's share of every epoch depends on that count. Resume with "
                f"trainer.devices × trainer.num_nodes = {written_by}, or start a new run."
            )
        self.sampler.set_epoch(state["epoch"])
        self.sampler.resume_at(state["epoch"], state["batches_served"] * state["batch_size"])
