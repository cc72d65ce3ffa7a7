"""Generic callbacks: the module says *what* to show or sample, these say *when*."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image

from ldm.pipeline import LatentDiffusionPipeline, SamplingOptions
from ldm.training.step_metrics import logging_due

log = logging.getLogger(__name__)


def _first_items(batch: dict[str, Any], count: int) -> dict[str, Any]:
    return {
        key: value[:count] if isinstance(value, torch.Tensor | list) else value
        for key, value in batch.items()
    }


class ImageLogger(Callback):
    """After each validation, log a grid of ``pl_module.log_images(batch)`` on fixed images.

    The batch is the first validation batch, so every grid of a run shows the same images.
    Each entry of the returned dict becomes one row (a module with ``sample_prompts`` gets them
    as the caption's columns); grids are also saved as PNG files in ``<run dir>/images``
    whatever the logger. Runs every ``every_n_epochs`` epochs and after the last one.
    """

    def __init__(self, num_images: int, image_dir: Path, every_n_epochs: int = 1) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"Image logging every_n_epochs must be ≥ 1, got {every_n_epochs}")
        self.num_images = num_images
        self.image_dir = Path(image_dir)
        self.every_n_epochs = every_n_epochs
        self._batch: dict[str, Any] | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        last_epoch = (
            trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        )
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last_epoch

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._batch is None and batch is not None and batch_idx == 0:
            self._batch = _first_items(batch, self.num_images)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch is None or trainer.sanity_checking or self.num_images < 1:
            return
        if not self._due(trainer):
            return
        rows = pl_module.log_images(self._batch)
        stacked = torch.cat([images.float().cpu() for images in rows.values()])
        grid = make_grid((stacked.clamp(-1, 1) + 1) / 2, nrow=len(next(iter(rows.values()))))
        self.image_dir.mkdir(parents=True, exist_ok=True)
        path = self.image_dir / f"{'_'.join(rows)}_step{trainer.global_step:07d}.png"
        save_image(grid, path)
        caption = " / ".join(f"row {i + 1}: {name}" for i, name in enumerate(rows))
        prompts = getattr(pl_module, "sample_prompts", None)
        if prompts:
            caption += " | columns: " + " | ".join(prompts)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="val/images", images=[grid], caption=[caption], step=trainer.global_step
                )
        log.info("Saved image grid %s", path)


class SampledCurves(Callback):
    """A quality curve beside the loss: every ``every_n_steps`` optimizer steps, on global rank
    zero, :meth:`measure_samples` judges samples of the EMA weights and the numbers are logged.
    Subclasses say what they sample and measure.

    ``pl_module`` must offer ``sampling_pipeline()``, ``ema.swapped_in(unet)``, ``unet`` and
    ``empty_context`` (:class:`~ldm.training.diffusion_module.LatentDiffusionModule` does).
    """

    def __init__(self, *, every_n_steps: int, sampling: SamplingOptions, seed: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"evaluation.every_n_steps must be ≥ 1 or null, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.options = sampling
        self.seed = seed
        self._measured_step = 0  # once per optimizer step, whatever the gradient accumulation

    @rank_zero_only
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._measured_step or trainer.sanity_checking:
            return
        self._measured_step = step
        metrics = self.measure(pl_module)
        # Lightning writes a step's metrics under the count of steps before it; so do we.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step - 1)
        log.info("Step %d: %s", step, ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))

    @torch.no_grad()
    def measure(self, pl_module: L.LightningModule) -> dict[str, float]:
        """This curve's numbers now, from samples of the EMA weights."""
        pipeline = pl_module.sampling_pipeline()
        with pl_module.ema.swapped_in(pl_module.unet):
            return self.measure_samples(pipeline, pl_module)

    def measure_samples(
        self, pipeline: LatentDiffusionPipeline, pl_module: L.LightningModule
    ) -> dict[str, float]:
        """The numbers to log, sampling through ``pipeline`` (the EMA weights are in)."""
        raise NotImplementedError

    def sample(
        self,
        pipeline: LatentDiffusionPipeline,
        pl_module: L.LightningModule,
        contexts: Tensor,
        first: int = 0,
    ) -> Tensor:
        """(B, 3, H, W) model-space images, one for each of ``contexts`` (B, L, D): sample i
        from seed + ``first`` + i, the same seeds at every measurement."""
        seeds = [self.seed + first + i for i in range(contexts.shape[0])]
        return pipeline.generate_from_context(
            contexts.to(pl_module.device), pl_module.empty_context, seeds, self.options
        )


class ThroughputLogger(Callback):
    """Samples per second of the training loop, logged every ``log_every_n_steps`` steps.

    Lightning's ThroughputMonitor synchronises the GPU after every batch. This one waits for
    the GPU only at logging steps (where the training module reads its metrics, and so waits,
    anyway) and around validation, whose time it leaves out, so each window's rate is the
    training loop's steady-state rate. The first step's wall time (compilation, cuDNN
    autotuning and warm-up included) is logged once as ``perf/first_step_seconds``; rates start
    after it.
    """

    def __init__(
        self, batch_size_fn: Callable[[Any], int], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.batch_size_fn = batch_size_fn
        self.clock = clock
        self._first_step_started: float | None = None
        self._first_step_done = False
        self._timing = False  # the clock runs: a training window, not validation
        self._resumed_at = 0.0
        self._seconds = 0.0
        self._samples = 0
        self._logged_step = 0  # one rate per optimizer step, whatever the accumulation

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._first_step_done and self._first_step_started is None:
            self._first_step_started = self.clock()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._first_step_started is not None:
            _wait_for_device(pl_module.device)
            seconds = self.clock() - self._first_step_started
            self._first_step_started, self._first_step_done = None, True
            self._timing, self._resumed_at = True, self.clock()
            self._log(trainer, {"perf/first_step_seconds": seconds})
            return
        self._samples += self.batch_size_fn(batch) * trainer.world_size
        if logging_due(trainer) and self._timing and trainer.global_step != self._logged_step:
            self._logged_step = trainer.global_step
            self._pause(pl_module)
            self._log(trainer, {"perf/samples_per_second": self._samples / self._seconds})
            self._seconds, self._samples = 0.0, 0
            self._timing, self._resumed_at = True, self.clock()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._timing:
            self._pause(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._first_step_done:
            self._timing, self._resumed_at = True, self.clock()

    def _pause(self, pl_module: L.LightningModule) -> None:
        _wait_for_device(pl_module.device)
        self._seconds += self.clock() - self._resumed_at
        self._timing = False

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        # Lightning writes a step's metrics under the count of steps before it; so do we.
        step = max(trainer.global_step - 1, 0)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _wait_for_device(device: torch.device) -> None:
    """Let queued GPU work finish so the clock measures it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
