"""Building the open_clip text tower, with its weights from a local file, the hub or a seed.

Only the text tower is kept: the vision tower (88M of ViT-B-32's 151M parameters) is dropped as
soon as the weights are in, so a training process never holds it.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import open_clip
import torch

from ldm.text.config import TextEncoderConfig
from ldm.text.quiet import open_clip_chatter_dropped

log = logging.getLogger(__name__)


class TextEncoderWeightsUnavailableError(RuntimeError):
    """The pretrained text-encoder weights could not be found locally nor downloaded."""


def load_text_tower(config: TextEncoderConfig) -> open_clip.CLIP:
    """The frozen (eval, no-grad) open_clip CLIP model of ``config`` without its vision tower."""
    weights_path = _resolve_weights(config)
    if weights_path is None:
        log.warning(
            "Text encoder %s uses a %s: its embeddings carry no learned meaning. Fine for the "
            "demo and tests; for real runs set text_encoder.pretrained or "
            "text_encoder.weights_file.",
            config.model_name,
            config.describe_weights(),
        )
    else:
        log.info("Text encoder %s: loading %s", config.model_name, weights_path)
    # seed the random init without touching the global RNG
    with torch.random.fork_rng(devices=[]), open_clip_chatter_dropped():
        torch.manual_seed(config.seed)
        try:
            model = open_clip.create_model(
                config.model_name,
                pretrained=str(weights_path) if weights_path else None,
                pretrained_text=False,  # never fetch a Hugging Face text tower behind our back
            )
        # open_clip reports a mismatched checkpoint as RuntimeError or a bare assert, a corrupt
        # file as an unpickling or safetensors error.
        except (
            RuntimeError,
            ValueError,
            AssertionError,
            EOFError,
            pickle.UnpicklingError,
        ) as error:
            if weights_path is None:
                raise
            raise ValueError(
                f"{weights_path} does not hold weights for open_clip model "
                f"{config.model_name!r} ({_summary(error)}). Use the checkpoint that belongs "
                "to text_encoder.model_name, or change model_name to match the file."
            ) from error
    if not isinstance(model, open_clip.CLIP):
        raise ValueError(
            f"text_encoder.model_name={config.model_name!r} builds a {type(model).__name__} "
            "with a custom text tower; this encoder supports open_clip CLIP models with the "
            "built-in causal text transformer, e.g. ViT-B-32 or ViT-L-14."
        )
    del model.visual
    return model.requires_grad_(False).eval()


def _resolve_weights(config: TextEncoderConfig) -> Path | None:
    """The local file to load: the configured one, or the pretrained tag's (downloaded once)."""
    if config.weights_file is not None:
        return config.existing_weights_file()
    if config.pretrained is None:
        return None
    tag_config = pretrained_tag_config(
        config.model_name, config.pretrained, setting="text_encoder.pretrained"
    )
    _warn_on_activation_mismatch(config, tag_config)
    log.info(
        "Fetching %s weights for tag %r from the Hugging Face hub or its local cache (without "
        "network, set HF_HUB_OFFLINE=1 to fail at once instead of after the hub's retries)",
        config.model_name,
        config.pretrained,
    )
    try:
        return Path(open_clip.download_pretrained(tag_config))
    except (OSError, RuntimeError) as error:  # the hub wraps every failure in one of these
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        raise TextEncoderWeightsUnavailableError(
            f"Could not get the {config.model_name} text-encoder weights for pretrained tag "
            f"{config.pretrained!r}: {_summary(error)}. "
            + ("HF_HUB_OFFLINE is set, so nothing is downloaded. " if offline else "")
            + "Either allow network access to the Hugging Face hub once (unset HF_HUB_OFFLINE) "
            "so the file lands in its cache, or download the checkpoint elsewhere and set "
            "text_encoder.weights_file=/path/to/open_clip_pytorch_model.bin, or set "
            "text_encoder.pretrained=null for a random-init encoder (demo/tests only)."
        ) from None


def pretrained_tag_config(model_name: str, tag: str, *, setting: str) -> dict[str, Any]:
    """open_clip's config of pretrained weights ``tag`` for ``model_name``; a ValueError naming
    the config ``setting`` and the model's known tags when there is no such tag."""
    tag_config = open_clip.get_pretrained_cfg(model_name, tag)
    if not tag_config:
        raise ValueError(
            f"{setting}={tag!r} is not an open_clip tag for {model_name}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(model_name)}."
        )
    return tag_config


def _warn_on_activation_mismatch(config: TextEncoderConfig, tag_config: dict) -> None:
    """OpenAI's weights need QuickGELU; loading them into a GELU model silently degrades them."""
    model_quick_gelu = open_clip.get_model_config(config.model_name).get("quick_gelu", False)
    if tag_config.get("quick_gelu", False) != model_quick_gelu:
        log.warning(
            "Pretrained tag %r was trained with quick_gelu=%s but model %s uses quick_gelu=%s; "
            "use the matching model name (e.g. %s-quickgelu) to get the embeddings it learned.",
            config.pretrained,
            tag_config.get("quick_gelu", False),
            config.model_name,
            model_quick_gelu,
            config.model_name.removesuffix("-quickgelu"),
        )


def _summary(error: BaseException, limit: int = 300) -> str:
    """The library's error on one short line: enough to diagnose, not a wall of text."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
