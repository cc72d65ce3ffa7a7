"""Prompt adherence as a training curve: quality, not just loss, while stage 2 trains.

On the synthetic set every caption can be checked against the pixels
(:func:`ldm.data.synthetic.read_attributes`). Every ``evaluation.every_n_steps`` optimizer steps
this callback samples fixed prompts of training and held-out combinations with the EMA weights
and logs, per split and attribute, the share of images that show what was asked
(``eval/adherence_<split>_<attribute>``) — the same measurement as ``evaluate.py
metrics=[adherence]``, on fewer images.
"""

from __future__ import annotations

import lightning as L
import numpy as np
from torch import Tensor

from ldm.data.transforms import model_tensor_to_uint8
from ldm.evaluation.adherence import PromptSets, attribute_accuracy
from ldm.pipeline import LatentDiffusionPipeline, SamplingOptions
from ldm.training.callbacks import SampledCurves


class AdherenceCurves(SampledCurves):
    """Samples ``prompts[split]`` (hidden states in ``contexts[split]``) every ``every_n_steps``
    and judges the samples with the palette ``prompts`` carries (that of the set trained on)."""

    def __init__(
        self,
        prompts: PromptSets,
        contexts: dict[str, Tensor],
        *,
        every_n_steps: int,
        sampling: SamplingOptions,
        images_per_prompt: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, sampling=sampling, seed=seed)
        if images_per_prompt < 1:
            raise ValueError(f"evaluation.images_per_prompt must be ≥ 1, got {images_per_prompt}")
        self.prompts = prompts
        self.contexts = contexts
        self.images_per_prompt = images_per_prompt

    def measure_samples(
        self, pipeline: LatentDiffusionPipeline, pl_module: L.LightningModule
    ) -> dict[str, float]:
        """Per split and attribute, the share of samples showing what was asked."""
        metrics: dict[str, float] = {}
        for split, asked in self.prompts.items():
            repeats = self.images_per_prompt
            images = self.sample(
                pipeline, pl_module, self.contexts[split].repeat_interleave(repeats, dim=0)
            )
            pixels = model_tensor_to_uint8(images.float().cpu()).permute(0, 2, 3, 1).numpy()
            wanted = [attributes for attributes in asked.values() for _ in range(repeats)]
            judged = zip(wanted, np.asarray(pixels), strict=True)
            accuracy = attribute_accuracy(judged, self.prompts.palette)
            metrics |= {f"eval/adherence_{split}_{name}": v for name, v in accuracy.items()}
        return metrics
