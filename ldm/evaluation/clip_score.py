"""CLIP score: how well each image matches its caption, by an open_clip model used directly.

Scale as in torchmetrics' ``CLIPScore`` (Hessel et al. 2021 without their w = 2.5):
``100 × max(cos(image embedding, caption embedding), 0)``, averaged over images (0: unrelated,
higher: closer). Images are resized to the model's input size the way open_clip's own
preprocessing does (bicubic, antialiased) and normalised with the model's mean and std. Scores
from different CLIP models are not comparable, so the model and its weights are recorded beside
every score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import open_clip
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ldm.evaluation.errors import EvaluationError, MetricWeightsUnavailableError, one_line
from ldm.text.loading import pretrained_tag_config
from ldm.text.quiet import open_clip_chatter_dropped

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
CLIP_SCORE_SCALE = "100 × max(cosine(image, caption), 0), mean over images (as torchmetrics)"


@dataclass(frozen=True)
class ClipScoreSettings:
    """``conf/evaluate.yaml``'s ``clip_score`` group: which open_clip model and weights."""

    model_name: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"  # null → random init (tests only)
    weights_file: Path | None = None  # a local checkpoint: no download

    def __post_init__(self) -> None:
        if self.model_name not in open_clip.list_models():
            raise EvaluationError(
                f"clip_score.model_name={self.model_name!r} is not an open_clip model; pick one "
                "of open_clip.list_models(), e.g. ViT-B-32."
            )
        if self.weights_file is not None and not Path(self.weights_file).is_file():
            raise EvaluationError(
                f"clip_score.weights_file={self.weights_file} does not exist; point it at an "
                f"open_clip checkpoint of {self.model_name}, or set it to null to use "
                "clip_score.pretrained."
            )

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "weights_file": None if self.weights_file is None else str(self.weights_file),
            "scale": CLIP_SCORE_SCALE,
        }


class ClipScorer:
    """An open_clip image and text tower, frozen, scoring (image, caption) pairs."""

    def __init__(self, settings: ClipScoreSettings, device: torch.device | str = "cpu") -> None:
        weights, tag_config = _weights(settings)
        if weights is None:
            log.warning(
                "CLIP score with a RANDOM-init %s: its scores carry no meaning (tests only); "
                "for real numbers set clip_score.pretrained or clip_score.weights_file.",
                settings.model_name,
            )
        # a random init (tests) is the same every time
        with torch.random.fork_rng(devices=[]), open_clip_chatter_dropped():
            torch.manual_seed(RANDOM_INIT_SEED)
            self.model = open_clip.create_model(
                settings.model_name,
                pretrained=weights,
                # a file path loses the tag's preprocessing (mean, std); give it back
                force_preprocess_cfg=tag_config,
            )
            self.tokenizer = open_clip.get_tokenizer(settings.model_name)
        self.model.requires_grad_(False).eval().to(device)
        self.device = torch.device(device)
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        size = preprocess["size"]
        self.input_size = list(size) if isinstance(size, tuple | list) else [size, size]
        self.mean = torch.tensor(preprocess["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess["std"], device=self.device).view(1, 3, 1, 1)

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) uint8 → the normalised float batch the image tower reads."""
        resized = TF.resize(
            images.to(self.device),
            self.input_size,
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        return (resized.float() / 255 - self.mean) / self.std

    @torch.no_grad()
    def scores(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """(B,) CLIP scores of uint8 images (B, 3, R, R) against their captions."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"Got {len(captions)} captions for {images.shape[0]} images")
        image_features = F.normalize(self.model.encode_image(self.model_inputs(images)), dim=-1)
        tokens = self.tokenizer(list(captions)).to(self.device)
        text_features = F.normalize(self.model.encode_text(tokens), dim=-1)
        cosine = (image_features * text_features).sum(dim=-1)
        return 100 * cosine.clamp(min=0)


def _weights(settings: ClipScoreSettings) -> tuple[str | None, dict[str, Any]]:
    """The local weights file to load (downloaded once for a pretrained tag) and the tag's
    preprocessing config."""
    if settings.weights_file is not None:
        return str(settings.weights_file), {}
    if settings.pretrained is None:
        return None, {}
    try:
        tag_config = pretrained_tag_config(
            settings.model_name, settings.pretrained, setting="clip_score.pretrained"
        )
    except ValueError as error:
        raise EvaluationError(str(error)) from None
    try:
        return open_clip.download_pretrained(tag_config), tag_config
    # open_clip re-raises hub failures as FileNotFoundError (an OSError) or RuntimeError.
    except (OSError, RuntimeError) as error:
        raise MetricWeightsUnavailableError(clip_unavailable_message(settings, error)) from None


def clip_unavailable_message(settings: ClipScoreSettings, error: BaseException) -> str:
    """What failed, where the weights come from and are cached, and how to get them offline."""
    cache_dir = huggingface_hub.constants.HF_HUB_CACHE
    return (
        f"The CLIP score needs the open_clip {settings.model_name} weights "
        f"{settings.pretrained!r}, which could not be loaded ({one_line(error)}). They are "
        f"downloaded once from the internet (the Hugging Face hub) and cached in {cache_dir}. "
        'Without network, run `python -c "import open_clip; open_clip.create_model('
        f"'{settings.model_name}', pretrained='{settings.pretrained}')\"` once on a connected "
        "machine and copy its Hugging Face cache (~/.cache/huggingface/hub by default) into "
        f"{cache_dir} here, or pass clip_score.weights_file=/path/to/its "
        "open_clip_model.safetensors. HF_HUB_OFFLINE=1 makes this fail at once instead of "
        "after the hub's retries."
    )
