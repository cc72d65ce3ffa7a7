"""The base of the data modules: a resumable train loader and evaluation loaders, sharded.

A data module keeps its train loader's position in its own checkpoint state, so a run resumed
mid-epoch continues where it stopped (see :mod:`ldm.data.resumable_loader`).

Under DDP both kinds of loader are sharded here, by the ranks of the Trainer the data module is
attached to: training by :class:`~ldm.data.resumable_loader.ResumableSampler`, evaluation by
torch's ``DistributedSampler``. Lightning's own sampler injection stays off
(``use_distributed_sampler=False``) because it would wrap, and shard a second time, the already
sharded training sampler.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ldm.data.resumable_loader import ResumableDataLoader, ResumableSampler


class ResumableDataModule(L.LightningDataModule):
    """A data module whose checkpoint state is its train loader's position.

    Lightning saves a stateful loader's ``state_dict`` itself, but restores it only into a loader
    it has not built yet, and ``trainer.estimated_stepping_batches`` (which sizes the LR schedule)
    builds the train loader before the checkpoint is read, so that copy would be dropped without
    a word. Data modules are restored before that, so the position also travels here and is
    applied when the loader is made (applying it twice is harmless).
    """

    def __init__(self) -> None:
        super().__init__()
        self._train_loader: ResumableDataLoader | None = None
        self._position_to_restore: dict[str, int] | None = None

    def processes(self) -> tuple[int, int]:
        """(number of training processes, this one's global rank), from the Trainer this data
        module is attached to; (1, 0) outside one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def resumable_train_loader(
        self, dataset: Dataset, *, seed: int, **loader_args: Any
    ) -> ResumableDataLoader:
        """A shuffled, resumable train loader, this process's shard of every epoch; it continues
        from a restored checkpoint, if any."""
        batch_size = loader_args["batch_size"]
        num_replicas, rank = self.processes()
        per_process = len(dataset) // num_replicas
        if per_process < batch_size:  # drop_last would leave an epoch without a single batch
            shares = f" ({per_process} in each of {num_replicas} processes)" * (num_replicas > 1)
            raise ValueError(
                f"Only {len(dataset)} training images{shares} for data.batch_size={batch_size}; "
                "lower the batch size."
            )
        sampler = ResumableSampler(
            len(dataset), seed=seed, shuffle=True, num_replicas=num_replicas, rank=rank
        )
        loader = ResumableDataLoader(dataset, sampler=sampler, drop_last=True, **loader_args)
        if self._position_to_restore is not None:
            loader.load_state_dict(self._position_to_restore)
            self._position_to_restore = None
        self._train_loader = loader
        return loader

    def evaluation_loader(self, dataset: Dataset, **loader_args: Any) -> DataLoader:
        """An in-order loader over this process's shard of ``dataset`` (all of it in a single
        process): validation work is split across processes, not repeated by each.

        ``DistributedSampler`` pads the shards to equal length with a few repeated items, so
        every process runs the same number of steps and its metric reductions line up.
        """
        num_replicas, rank = self.processes()
        sampler = None
        if num_replicas > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False
            )
        return DataLoader(dataset, sampler=sampler, shuffle=False, drop_last=False, **loader_args)

    def state_dict(self) -> dict[str, Any]:
        return (
            {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position_to_restore = state_dict.get("train_loader")
