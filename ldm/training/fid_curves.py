"""FID-k as a training curve: image quality, not just loss, while stage 2 trains.

Every ``evaluation.every_n_steps`` optimizer steps this callback samples, with the EMA weights
and fixed seeds, one image for each of k fixed captions — the first caption of each of the first
k validation images — and logs the FID between those samples and these k validation images
(``eval/fid_<k>``). Both sides become evaluation pixels exactly as in ``evaluate.py``
(:mod:`ldm.evaluation.pixels`); the real side's features are extracted once, at the first
measurement, and kept. FID is biased upwards for small sets, so FID-k is a curve to follow
within a run (or across runs with the same k), not a number to compare with ``evaluate.py``'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.data.coco_index import CaptionedImage
from ldm.evaluation.fid import FidSettings, add_images, build_fid, fid_value
from ldm.evaluation.pixels import batched, eval_pixels_of_model_images, read_eval_pixels
from ldm.evaluation.validation_data import validation_captions
from ldm.pipeline import LatentDiffusionPipeline, SamplingOptions
from ldm.training.callbacks import SampledCurves


def fid_k_metric(k: int, settings: FidSettings) -> FrechetInceptionDistance:
    """FID-k's metric, built before any training work: a bad k, or Inception weights that
    cannot be had, stops the run in seconds rather than after the latent caches are built."""
    if k < 2:
        raise ValueError(
            f"evaluation.fid_k must be at least 2 (FID needs a covariance on each side), got "
            f"{k}: set it to e.g. 256, or to null for no FID curve."
        )
    return build_fid(settings)


def fid_k_reference(records: Sequence[CaptionedImage], k: int) -> tuple[list[Path], list[str]]:
    """FID-k's real images and prompts: the first k validation images and the first caption of
    each, in annotation order, so every measurement (and every run on the same data) compares
    the same things."""
    if k > len(records):
        raise ValueError(
            f"evaluation.fid_k={k} needs {k} validation images, but the validation split has "
            f"{len(records)} usable ones: set evaluation.fid_k to at most {len(records)}, or "
            "use a larger validation split (data.val_subset)."
        )
    chosen = records[:k]
    return [record.path for record in chosen], validation_captions(chosen, k)


class FidCurves(SampledCurves):
    """Logs ``eval/fid_<k>`` every ``every_n_steps`` optimizer steps.

    ``fid`` is a metric from :func:`fid_k_metric`; ``contexts`` (k, L, D) are the text hidden
    states of the k prompts whose images are ``real_images``.
    """

    def __init__(
        self,
        fid: FrechetInceptionDistance,
        real_images: Sequence[Path],
        contexts: Tensor,
        *,
        every_n_steps: int,
        sampling: SamplingOptions,
        resolution_px: int,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, sampling=sampling, seed=seed)
        if len(real_images) != contexts.shape[0]:
            raise ValueError(
                f"FID-k needs one prompt per real image: got {contexts.shape[0]} prompts for "
                f"{len(real_images)} images"
            )
        self.fid = fid
        self.real_images = list(real_images)
        self.contexts = contexts
        self.k = len(self.real_images)
        self.resolution_px = resolution_px
        self.batch_size = batch_size

    def measure_samples(
        self, pipeline: LatentDiffusionPipeline, pl_module: L.LightningModule
    ) -> dict[str, float]:
        """The FID between k samples of the fixed prompts and the k real images."""
        fid = self.fid.to(pl_module.device)
        if int(fid.real_features_num_samples) == 0:  # first measurement: the real side, once
            real = (
                read_eval_pixels(paths, self.resolution_px)
                for paths in batched(self.real_images, self.batch_size)
            )
            add_images(fid, real, real=True)
        fid.reset()  # the generated side only: the real features are kept
        add_images(fid, self._samples(pipeline, pl_module), real=False)
        return {f"eval/fid_{self.k}": fid_value(fid)}

    def _samples(
        self, pipeline: LatentDiffusionPipeline, pl_module: L.LightningModule
    ) -> Iterator[Tensor]:
        """The k samples in (B, 3, R, R) uint8 batches of evaluation pixels."""
        for chunk in batched(range(self.k), self.batch_size):
            contexts = self.contexts[chunk.start : chunk.stop]
            images = self.sample(pipeline, pl_module, contexts, first=chunk.start)
            yield eval_pixels_of_model_images(images.float(), self.resolution_px)
