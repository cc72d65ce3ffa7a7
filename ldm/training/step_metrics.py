"""Training metrics that stay on the device between logging steps.

Reading a GPU scalar on the host (``.item()``, ``float(tensor)``, a progress bar showing a
tensor) waits for every queued kernel. The training modules therefore add each step's scalars
to a :class:`MetricWindow` on the device and read the window once every
``trainer.log_every_n_steps`` steps — the cadence at which Lightning writes to the loggers anyway
(mosaicml/diffusion and nanoGPT log every N steps for the same reason).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor


def logging_due(trainer: L.Trainer) -> bool:
    """True in ``on_train_batch_end`` of a batch whose metrics Lightning will send to the
    loggers: every ``log_every_n_steps``-th optimizer step (``global_step`` has already counted
    this batch's step)."""
    every = trainer.log_every_n_steps
    return bool(every) and trainer.global_step % every == 0


def logging_due_after_this_step(trainer: L.Trainer) -> bool:
    """:func:`logging_due` asked from inside ``training_step``, before the optimizer steps."""
    every = trainer.log_every_n_steps
    return bool(every) and (trainer.global_step + 1) % every == 0


class MetricWindow:
    """Per-step scalars summed on the device and read as means once per logging window.

    ``add(names, total, count)`` accumulates ``total`` over ``count`` samples. A vector
    ``total`` (e.g. per-timestep-bucket loss sums, with per-bucket ``count``) takes one name per
    element, so each mean is exact even when a bucket got different numbers of samples in
    different steps.
    """

    def __init__(self) -> None:
        self._totals: dict[tuple[str, ...], Tensor] = {}
        self._counts: dict[tuple[str, ...], Tensor | float] = {}

    def add(self, names: str | tuple[str, ...], total: Tensor, count: Tensor | float = 1.0) -> None:
        key = (names,) if isinstance(names, str) else tuple(names)
        total = total.detach().float().reshape(len(key))
        if key in self._totals:
            self._totals[key] = self._totals[key] + total
            self._counts[key] = self._counts[key] + count
        else:
            self._totals[key], self._counts[key] = total, count

    def __bool__(self) -> bool:
        return bool(self._totals)

    def read_means(self) -> dict[str, Tensor]:
        """Every metric's window mean as a 0-d CPU tensor (one host sync for all), then reset.

        A mean over no samples (an empty timestep bucket) is NaN; callers drop those.
        """
        keys = list(self._totals)
        device = self._totals[keys[0]].device
        totals = torch.cat([self._totals[key] for key in keys])
        counts = torch.cat(
            [
                torch.as_tensor(self._counts[key], dtype=torch.float32, device=device)
                .reshape(-1)
                .expand(len(key))
                for key in keys
            ]
        )
        means = (totals / counts).cpu()
        self._totals.clear()
        self._counts.clear()
        names = [name for key in keys for name in key]
        return dict(zip(names, means, strict=True))
