"""The checkpoints both stages write, and what keeps them usable when a run dies.

``best.ckpt`` by a validation metric, ``last.ckpt`` to resume from (refreshed every
``trainer.checkpoint_every_n_steps`` steps, at every epoch end, and when SIGTERM or Ctrl-C stops
the run). Every checkpoint is written atomically (:class:`AtomicCheckpointIO`), so a kill, a
power cut or a full disk leaves the previous complete file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import threading
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ldm.runs import require_writable_dir

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the file it was to replace is unchanged."""


def save_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    """``checkpoint`` serialised by ``torch.save`` into a temporary file beside ``path``, flushed
    to disk, then renamed over ``path``: readers see the old complete file or the new complete
    one, whatever happens.

    The rename is atomic only within one filesystem, hence the same directory. The directory is
    synced too, so the rename itself survives a power cut.
    """
    path = Path(path)
    # Serialised in memory first (as Lightning does): a write that fails, e.g. on a full disk,
    # then raises its OSError, where inside torch.save it becomes an opaque RuntimeError.
    serialised = io.BytesIO()
    torch.save(checkpoint, serialised)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("xb") as file:  # default permissions, unlike mkstemp's 0600
            file.write(serialised.getbuffer())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointWriteError(
                error.errno,
                f"Could not write the checkpoint {path}: {error.strerror or error}. The previous "
                f"{path.name}, if any, is unchanged. Free space in {path.parent} or make it "
                "writable, then resume from the last checkpoint.",
            ) from error
        raise
    with contextlib.suppress(OSError):  # some filesystems cannot sync a directory
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic (:func:`save_atomically`) for every checkpoint
    the Trainer writes; remembers the last one written, for error messages."""

    def __init__(self) -> None:
        self.last_saved: tuple[Path, int] | None = None  # (path, global step)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_atomically(checkpoint, Path(path))
        self.last_saved = (Path(path), int(checkpoint.get("global_step", 0)))


def estimated_checkpoint_bytes(module: L.LightningModule) -> int:
    """Size of one resumable checkpoint: the state dict (weights, EMA, buffers) and AdamW's two
    float32 moments per trainable parameter."""
    tensors = [t for t in module.state_dict().values() if isinstance(t, torch.Tensor)]
    state = sum(t.numel() * t.element_size() for t in tensors)
    moments = sum(2 * 4 * p.numel() for p in module.parameters() if p.requires_grad)
    return state + moments


class CheckpointDirCheck(Callback):
    """Refuses, before training, a checkpoint directory that cannot be written or lacks room for
    two checkpoints (the new one is written beside the one it replaces)."""

    def __init__(self, checkpoint_dir: Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            needed = 2 * estimated_checkpoint_bytes(pl_module)
            require_writable_dir(self.checkpoint_dir, "checkpoint directory", needed_bytes=needed)


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


class SaveLastOnStop(Callback):
    """SIGTERM (preemption) or Ctrl-C: finish the current step, write ``last.ckpt``, exit.

    Lightning's own SIGTERM handling does the stopping: its handler only sets a flag, and the
    loop raises ``SIGTERMException`` at the next step boundary (or inside validation), where the
    weights, optimizer, EMA and data position agree. This callback writes the checkpoint there
    and makes the exit status say how the run ended (128 + signal number, as a shell does),
    so a script does not go on to the next stage as if training had finished.

    Ctrl-C (SIGINT) would raise KeyboardInterrupt wherever the step happens to be, possibly
    between the optimizer and the EMA update, so during training the first one is turned into
    a SIGTERM; a second one interrupts at once, without a checkpoint.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._signal = signal.SIGTERM

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed after Lightning registered its handlers, which it restores when fit ends.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._stop_like_sigterm)

    def _stop_like_sigterm(self, signum: int, frame: FrameType | None) -> None:
        log.warning(
            "Ctrl-C: stopping after this step and writing %s (press Ctrl-C again to stop at "
            "once, without a checkpoint).",
            self.path,
        )
        self._signal = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.raise_signal(signal.SIGTERM)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = 128 + self._signal
        if trainer.sanity_checking or trainer.fast_dev_run:
            return  # nothing trained yet in this run
        trainer.save_checkpoint(self.path, weights_only=False)
        log.warning(
            "%s: stopped after optimizer step %d and wrote %s. Resume with ckpt_path=%s "
            "(or ckpt_path=last).",
            signal.Signals(self._signal).name,
            trainer.global_step,
            self.path,
            self.path,
        )


def checkpoint_callbacks(
    checkpoint_dir: Path, *, monitor: str, every_n_steps: int
) -> tuple[list[Callback], ModelCheckpoint]:
    """The callbacks that keep ``best.ckpt`` (lowest ``monitor``) and ``last.ckpt`` up to date
    (also on SIGTERM and Ctrl-C) after checking the directory can take them, and the one for
    ``best`` alone, whose ``best_model_path`` the stage reads after training."""
    best = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor=monitor, mode="min", save_top_k=1
    )
    periodic = ModelCheckpoint(
        dirpath=checkpoint_dir, every_n_train_steps=every_n_steps, save_top_k=0, save_last=True
    )
    last = Path(checkpoint_dir) / "last.ckpt"
    callbacks = [
        CheckpointDirCheck(checkpoint_dir),
        best,
        periodic,
        SaveLastAtEpochEnd(last),
        SaveLastOnStop(last),
    ]
    return callbacks, best
