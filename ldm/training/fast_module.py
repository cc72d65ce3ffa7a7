"""What both stages' Lightning modules share to keep a GPU step free of host syncs.

* Scalars go to a :class:`~ldm.training.step_metrics.MetricWindow` and reach the loggers (as CPU
  tensors, so neither the loggers nor the progress bar read the GPU again) every
  ``trainer.log_every_n_steps`` steps, summed over the processes of a DDP run right then: the
  only collective the metrics add, once per window.
* The gradient norm comes from the clipping call itself (Lightning's ``grad_norm`` utility costs
  one ``.item()`` per parameter tensor).
* A step whose loss or gradient is not finite changes nothing: not the weights, not AdamW's
  moments, not its step count (:meth:`FastTrainingModule.configure_gradient_clipping`). Such
  steps are counted on the device (``train/skipped_steps``), and ``max_consecutive_nonfinite``
  of them in a row stop the run (:class:`NonFiniteTrainingError`). Under DDP the verdict costs
  one scalar all-reduce per step (queued, no host wait), so that every process skips alike.
* The loss computation can be wrapped in ``torch.compile`` (``trainer.compile``); evaluation and
  sampling stay eager, so they accept any batch size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ldm.training.step_metrics import MetricWindow, NonFiniteSteps, logging_due

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class FastTrainingModule(L.LightningModule):
    """Base for the VAE and U-Net modules; subclasses set :attr:`trained` and call
    :meth:`compiled` on their loss function."""

    def __init__(
        self,
        *,
        compile_mode: str = "none",
        fused_optimizer: bool = False,
        max_consecutive_nonfinite: int | None = 10,
    ) -> None:
        super().__init__()
        self.compile_mode = compile_mode  # validated with the device (ldm.devices)
        self.fused_optimizer = fused_optimizer
        self.window = MetricWindow()
        self.nonfinite_steps = NonFiniteSteps(max_consecutive_nonfinite)
        self._losses_finite: torch.Tensor | None = None  # of this optimizer step's micro-batches
        self._last_logged_step = -1

    @property
    def trained(self) -> torch.nn.Module:
        """The network the optimizer trains (clipped and measured here)."""
        raise NotImplementedError

    def compiled(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` under ``torch.compile`` when ``trainer.compile`` asks for it.

        Static shapes (``dynamic=False``): the training loaders drop the last partial batch, so
        one graph serves the whole run.
        """
        if self.compile_mode == "none":
            return function
        return torch.compile(function, mode=self.compile_mode, dynamic=False)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm (``trainer.gradient_clip_val``; null or 0: measure only) and keep
        the norm that the clipping computes anyway."""
        parameters = [p for p in self.trained.parameters() if p.grad is not None]
        if not parameters:
            return
        if gradient_clip_val:
            norm = torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True)
        self.window.add("train/grad_norm", norm)
        self._skip_update_if_nonfinite(optimizer, norm)

    def on_before_backward(self, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        if self._losses_finite is not None:  # an earlier micro-batch of this optimizer step
            finite = finite & self._losses_finite
        self._losses_finite = finite

    def _skip_update_if_nonfinite(
        self, optimizer: torch.optim.Optimizer, grad_norm: Tensor
    ) -> None:
        """Make this optimizer step a no-op when its loss or gradient is not finite, and count
        the step either way.

        The fused AdamW takes the verdict as a device tensor, ``found_inf`` (how torch's
        GradScaler skips steps), and leaves weights, moments and step count untouched, so
        nothing is read back. The unfused one has no such input: its verdict is read on the host
        (a GPU sync; the CUDA profile uses the fused one) and the gradients are dropped, which
        makes its step a no-op. Under DDP the verdict is summed over the processes, so they all
        skip alike. The EMA still averages after a skipped step, towards the unchanged weights,
        as it does after a step the GradScaler skips.
        """
        finite = torch.isfinite(grad_norm)
        if self._losses_finite is not None:
            finite = finite & self._losses_finite
        self._losses_finite = None
        nonfinite = self.sum_over_processes((~finite).float()) > 0
        self.nonfinite_steps.record(nonfinite, step=self.global_step + 1)
        if self.fused_optimizer:
            optimizer.found_inf = nonfinite.float()
        elif nonfinite:
            optimizer.zero_grad(set_to_none=True)

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every training process (itself in a single-process run).

        One all-reduce queued on the device, like DDP's own gradient reduction: no host wait.
        (Lightning's ``strategy.reduce`` puts a barrier first, which under NCCL synchronises
        the device.)
        """
        if self.trainer.world_size == 1:
            return tensor
        summed = tensor.clone()
        torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
        return summed

    def log_window_if_due(self, extra: dict[str, float] | None = None) -> None:
        """Send the window's means (and ``extra`` host values) to the loggers at the cadence."""
        if not logging_due(self.trainer) or self.global_step == self._last_logged_step:
            return
        self._last_logged_step = self.global_step
        if not self.window:
            return
        values = self.window.read_means(self.sum_over_processes)
        values |= {name: torch.tensor(value) for name, value in (extra or {}).items()}
        for name, value in values.items():
            if not math.isnan(float(value)):  # a CPU tensor: no device read
                self.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "train/loss")

    def host_metrics(self) -> dict[str, float]:
        """Host values logged with each window (subclasses add theirs)."""
        return {}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop a run stuck on non-finite steps and log the window, at the logging cadence;
        with the unfused optimizer after every step (its step has read the verdict already)."""
        if self.fused_optimizer and not logging_due(self.trainer):
            return
        skipped = self._stop_if_nonfinite_limit_reached()
        self.log_window_if_due(self.host_metrics() | {"train/skipped_steps": float(skipped)})

    def on_train_epoch_end(self) -> None:
        self._stop_if_nonfinite_limit_reached()  # also when logging is off

    def _stop_if_nonfinite_limit_reached(self) -> int:
        """Raise :class:`NonFiniteTrainingError` once ``max_consecutive_nonfinite`` steps in a row
        were skipped; else return how many steps were skipped so far."""
        skipped, _, limit_reached_at = self.nonfinite_steps.read()
        if limit_reached_at < 0:
            return skipped
        limit = self.nonfinite_steps.max_consecutive
        saved = getattr(self.trainer.strategy.checkpoint_io, "last_saved", None)
        if saved is not None:
            checkpoint = f"The last checkpoint written is {saved[0]} (after step {saved[1]})"
        elif self.trainer.ckpt_path:
            checkpoint = f"No checkpoint was written since resuming from {self.trainer.ckpt_path}"
        else:
            checkpoint = "No checkpoint was written yet"
        raise NonFiniteTrainingError(
            f"Stopped: optimizer steps {limit_reached_at - limit + 1} to {limit_reached_at} "
            f"({limit} in a row, trainer.max_consecutive_nonfinite={limit}) had a non-finite "
            f"loss or gradient. Their updates were skipped, so the weights are still finite. "
            f"{checkpoint}. Resuming replays the same batches: lower optim.lr, look for bad "
            "input in those batches, or set trainer.max_consecutive_nonfinite=null to keep "
            "skipping such steps."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "nonfinite_steps" in checkpoint:  # absent from checkpoints of older versions
            self.nonfinite_steps.load_state(checkpoint["nonfinite_steps"])
