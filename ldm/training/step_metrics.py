"""Training metrics that stay on the device between logging steps.

Reading a GPU scalar on the host (``.item()``, ``float(tensor)``, a progress bar showing a
tensor) waits for every queued kernel. The training modules therefore add each step's scalars
to a :class:`MetricWindow` on the device and read the window once every
``trainer.log_every_n_steps`` steps — the cadence at which Lightning writes to the loggers anyway
(mosaicml/diffusion and nanoGPT log every N steps for the same reason).
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor


def logging_due(trainer: L.Trainer) -> bool:
    """True in ``on_train_batch_end`` of a batch whose metrics Lightning will send to the
    loggers: every ``log_every_n_steps``-th optimizer step (``global_step`` has already counted
    this batch's step). Under gradient accumulation it stays true for the micro-batches that
    follow, until the next optimizer step: callers act once per step."""
    every = trainer.log_every_n_steps
    step = trainer.global_step
    return bool(every) and step > 0 and step % every == 0


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
        """Non-finite elements (from a step whose update was skipped) are left out with their
        count: one bad step must not turn a whole window's means into NaN."""
        key = (names,) if isinstance(names, str) else tuple(names)
        total = total.detach().float().reshape(len(key))
        finite = torch.isfinite(total)
        total, count = torch.where(finite, total, 0.0), torch.where(finite, count, 0.0)
        if key in self._totals:
            self._totals[key] = self._totals[key] + total
            self._counts[key] = self._counts[key] + count
        else:
            self._totals[key], self._counts[key] = total, count

    def __bool__(self) -> bool:
        return bool(self._totals)

    def read_means(
        self, sum_over_processes: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Every metric's window mean as a 0-d CPU tensor (one host sync for all), then reset.

        ``sum_over_processes`` (under DDP: an all-reduce) adds up every process's totals and
        counts in one collective before the division, so each mean is exact over all processes'
        samples and identical in every process. A mean over no samples (an empty timestep
        bucket) is NaN; callers drop those.
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
        if sum_over_processes is not None:
            totals, counts = sum_over_processes(torch.stack([totals, counts])).unbind()
        means = (totals / counts).cpu()
        self._totals.clear()
        self._counts.clear()
        names = [name for key in keys for name in key]
        return dict(zip(names, means, strict=True))


class NonFiniteSteps(torch.nn.Module):
    """Training steps skipped for a non-finite loss or gradient, counted on the device.

    ``counts`` holds [steps skipped so far, the current run of consecutive ones, the step at
    which such a run first reached ``max_consecutive`` (-1: none)]. :meth:`record` updates it
    without reading anything back; the host reads it at the logging cadence (:meth:`read`).
    A non-persistent buffer moves with the module yet stays out of the state dict, so older
    checkpoints still load; :meth:`state` and :meth:`load_state` carry it in the checkpoint.
    """

    def __init__(self, max_consecutive: int | None) -> None:
        super().__init__()
        if max_consecutive is not None and max_consecutive < 1:
            raise ValueError(
                f"trainer.max_consecutive_nonfinite must be a positive number of steps or null "
                f"(never stop), got {max_consecutive}."
            )
        self.max_consecutive = max_consecutive
        self.register_buffer("counts", torch.tensor([0, 0, -1]), persistent=False)

    def record(self, nonfinite: Tensor, step: int) -> None:
        """Count optimizer step ``step`` (1-based), skipped if ``nonfinite`` (a 0-d bool)."""
        bad = nonfinite.long()
        skipped, streak, limit_reached_at = self.counts.unbind()
        streak = (streak + 1) * bad
        if self.max_consecutive is not None:
            first_time = (limit_reached_at < 0) & (streak >= self.max_consecutive)
            limit_reached_at = torch.where(first_time, step, limit_reached_at)
        self.counts.copy_(torch.stack([skipped + bad, streak, limit_reached_at]))

    def read(self) -> tuple[int, int, int]:
        """(skipped, current consecutive run, step the limit was reached or -1): a host read."""
        skipped, streak, limit_reached_at = self.counts.tolist()
        return skipped, streak, limit_reached_at

    def state(self) -> dict[str, int]:
        skipped, streak, _ = self.read()
        return {"skipped": skipped, "consecutive": streak}

    def load_state(self, state: dict[str, int]) -> None:
        """A resumed run continues the counts; reaching the limit again is what stops it."""
        self.counts.copy_(torch.tensor([state["skipped"], state["consecutive"], -1]))
