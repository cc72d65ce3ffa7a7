"""What both stages' Lightning modules share to keep a GPU step free of host syncs.

* Scalars go to a :class:`~ldm.training.step_metrics.MetricWindow` and reach the loggers (as CPU
  tensors, so neither the loggers nor the progress bar read the GPU again) every
  ``trainer.log_every_n_steps`` steps.
* The gradient norm comes from the clipping call itself (Lightning's ``grad_norm`` utility costs
  one ``.item()`` per parameter tensor).
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

from ldm.training.step_metrics import MetricWindow, logging_due

log = logging.getLogger(__name__)


class FastTrainingModule(L.LightningModule):
    """Base for the VAE and U-Net modules; subclasses set :attr:`trained` and call
    :meth:`compiled` on their loss function."""

    def __init__(self, *, compile_mode: str = "none", fused_optimizer: bool = False) -> None:
        super().__init__()
        self.compile_mode = compile_mode  # validated with the device (ldm.devices)
        self.fused_optimizer = fused_optimizer
        self.window = MetricWindow()
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

    def log_window_if_due(self, extra: dict[str, float] | None = None) -> None:
        """Send the window's means (and ``extra`` host values) to the loggers at the cadence."""
        if not logging_due(self.trainer) or self.global_step == self._last_logged_step:
            return
        self._last_logged_step = self.global_step
        if not self.window:
            return
        values = self.window.read_means()
        values |= {name: torch.tensor(value) for name, value in (extra or {}).items()}
        for name, value in values.items():
            if not math.isnan(float(value)):  # a CPU tensor: no device read
                self.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "train/loss")
