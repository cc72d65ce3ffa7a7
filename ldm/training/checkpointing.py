"""The checkpoints both stages write: ``best.ckpt`` by a validation metric, ``last.ckpt`` to
resume from (refreshed every N steps and at every epoch end)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


class SaveLastAtEpochEnd(Callback):
    """Writes ``last.ckpt`` at the end of every training epoch, after its validation if any.

    A step-triggered ModelCheckpoint cannot also save at epoch ends, and an epoch-triggered one
    saves only in epochs that validate when ``check_val_every_n_epoch`` > 1; without this the
    final steps of a run would be missing from the checkpoint a later run resumes from.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and not trainer.fast_dev_run:
            trainer.save_checkpoint(self.path, weights_only=False)  # all state, to resume


def checkpoint_callbacks(
    checkpoint_dir: Path, *, monitor: str, every_n_steps: int
) -> tuple[list[Callback], ModelCheckpoint]:
    """The callbacks that keep ``best.ckpt`` (lowest ``monitor``) and ``last.ckpt`` up to date,
    and the one for ``best`` alone, whose ``best_model_path`` the stage reads after training."""
    best = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor=monitor, mode="min", save_top_k=1
    )
    periodic = ModelCheckpoint(
        dirpath=checkpoint_dir, every_n_train_steps=every_n_steps, save_top_k=0, save_last=True
    )
    return [best, periodic, SaveLastAtEpochEnd(Path(checkpoint_dir) / "last.ckpt")], best
