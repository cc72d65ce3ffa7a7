"""The guidance sweep: every metric of the samples, for each (cfg_scale, steps) setting.

The expensive fixed parts — the models, the real images' FID features, the CLIP model, the
analyser check — are prepared once by the caller; each setting only samples and scores. FID and
CLIP score share one set of samples (one per caption), so they describe the same images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.evaluation.adherence import Attributes, measure_adherence
from ldm.evaluation.clip_score import ClipScorer
from ldm.evaluation.fid import fid_value
from ldm.evaluation.generation import SamplingModel, generate
from ldm.evaluation.pixels import eval_pixels_of_model_images
from ldm.evaluation.request import SweepSetting

CAPTION_SAMPLES_DIR = "captions"
ADHERENCE_SAMPLES_DIR = "adherence"


@dataclass(frozen=True)
class SampleJudges:
    """What each setting's samples are measured with; None where a metric was not asked."""

    captions: list[str] | None  # FID and CLIP score samples: one image per caption
    fid: FrechetInceptionDistance | None  # its real side already filled
    clip: ClipScorer | None
    adherence_prompts: dict[str, dict[str, Attributes]] | None  # per split
    adherence_images_per_prompt: int = 2


@dataclass(frozen=True)
class SamplingPlan:
    """How every setting samples: the same seeds, batches and resolution for each."""

    seed: int
    batch_size: int
    resolution_px: int
    progress: bool


def measure_setting(
    model: SamplingModel,
    setting: SweepSetting,
    judges: SampleJudges,
    plan: SamplingPlan,
    samples_dir: Path,
) -> dict[str, Any]:
    """The metrics of one setting's samples, which are kept under ``samples_dir``."""
    metrics: dict[str, Any] = {}
    if judges.captions is not None:
        metrics |= _caption_metrics(model, setting, judges, plan, samples_dir / CAPTION_SAMPLES_DIR)
    if judges.adherence_prompts is not None:

        def samples(split: str, prompts: list[str]) -> Iterator[tuple[str, np.ndarray]]:
            for jobs, images in generate(
                model,
                prompts,
                setting.options,
                images_per_prompt=judges.adherence_images_per_prompt,
                seed=plan.seed,
                batch_size=plan.batch_size,
                out_dir=samples_dir / ADHERENCE_SAMPLES_DIR / split,
                progress=plan.progress,
                description=f"Adherence, {split} prompts ({setting.label})",
            ):
                pixels = eval_pixels_of_model_images(images, plan.resolution_px)
                for job, image in zip(jobs, pixels, strict=True):
                    yield job.prompt, image.permute(1, 2, 0).numpy()

        adherence = measure_adherence(judges.adherence_prompts, samples)
        metrics["adherence"] = {split: scores.as_dict() for split, scores in adherence.items()}
    return metrics


def _caption_metrics(
    model: SamplingModel,
    setting: SweepSetting,
    judges: SampleJudges,
    plan: SamplingPlan,
    out_dir: Path,
) -> dict[str, float]:
    """FID and CLIP score of one image per caption, scored batch by batch as they are made."""
    if judges.fid is not None:
        judges.fid.reset()  # the generated side only: the real features are kept
    clip_total = 0.0
    for jobs, images in generate(
        model,
        judges.captions,
        setting.options,
        images_per_prompt=1,
        seed=plan.seed,
        batch_size=plan.batch_size,
        out_dir=out_dir,
        progress=plan.progress,
        description=f"Sampling captions ({setting.label})",
    ):
        pixels = eval_pixels_of_model_images(images, plan.resolution_px)
        if judges.fid is not None:
            judges.fid.update(pixels.to(judges.fid.device), real=False)
        if judges.clip is not None:
            clip_total += float(judges.clip.scores(pixels, [job.prompt for job in jobs]).sum())
    metrics = {}
    if judges.fid is not None:
        metrics["fid"] = fid_value(judges.fid)
    if judges.clip is not None:
        metrics["clip_score"] = clip_total / len(judges.captions)
    return metrics
