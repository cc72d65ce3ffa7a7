"""Prompt adherence as a training curve: quality, not just loss, while stage 2 trains.

On the synthetic set every caption can be checked against the pixels
(:func:`ldm.data.synthetic.read_attributes`). Every ``evaluation.every_n_steps`` optimizer steps
this callback samples fixed prompts of training and held-out combinations with the EMA weights
and logs, per split and attribute, the share of images that show what was asked
(``eval/adherence_<split>_<attribute>``) — the same measurement as ``evaluate.py
metrics=[adherence]``, on fewer images.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from ldm.data.transforms import model_tensor_to_uint8
from ldm.evaluation.adherence import PromptSets, attribute_accuracy
from ldm.pipeline import SamplingOptions

log = logging.getLogger(__name__)


class AdherenceCurves(Callback):
    """Samples ``prompts[split]`` (hidden states in ``contexts[split]``) every ``every_n_steps``
    and judges the samples with the palette ``prompts`` carries (that of the set trained on).

    ``pl_module`` must offer ``sampling_pipeline()``, ``ema.swapped_in(unet)``, ``unet`` and
    ``empty_context`` (:class:`~ldm.training.diffusion_module.LatentDiffusionModule` does).
    """

    def __init__(
        self,
        prompts: PromptSets,
        contexts: dict[str, Tensor],
        *,
        every_n_steps: int,
        sampling: dict[str, Any],
        images_per_prompt: int = 1,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"evaluation.every_n_steps must be ≥ 1 or null, got {every_n_steps}")
        if images_per_prompt < 1:
            raise ValueError(f"evaluation.images_per_prompt must be ≥ 1, got {images_per_prompt}")
        self.prompts = prompts
        self.contexts = contexts
        self.every_n_steps = every_n_steps
        self.options = SamplingOptions(**sampling)
        self.images_per_prompt = images_per_prompt
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
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step - 1)
        log.info(
            "Step %d adherence: %s",
            trainer.global_step,
            ", ".join(f"{name.split('/')[-1]}={value:.2f}" for name, value in metrics.items()),
        )

    @torch.no_grad()
    def measure(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Per split and attribute, the share of samples (EMA weights) showing what was asked."""
        pipeline = pl_module.sampling_pipeline()
        metrics: dict[str, float] = {}
        with pl_module.ema.swapped_in(pl_module.unet):
            for split, asked in self.prompts.items():
                repeats = self.images_per_prompt
                context = self.contexts[split].repeat_interleave(repeats, dim=0)
                seeds = [self.seed + i for i in range(context.shape[0])]
                images = pipeline.generate_from_context(
                    context.to(pl_module.device), pl_module.empty_context, seeds, self.options
                )
                pixels = model_tensor_to_uint8(images.float().cpu()).permute(0, 2, 3, 1).numpy()
                wanted = [attributes for attributes in asked.values() for _ in range(repeats)]
                judged = zip(wanted, np.asarray(pixels), strict=True)
                accuracy = attribute_accuracy(judged, self.prompts.palette)
                metrics |= {f"eval/adherence_{split}_{name}": v for name, v in accuracy.items()}
        return metrics
