"""The text-encoder section of the config (``conf/text_encoder/default.yaml``), checked once.

Its fingerprint is what caches of text hidden states are keyed by: two configs with the same
fingerprint produce the same hidden states for the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip

from ldm.config.parse import dataclass_from_dict
from ldm.exports import file_fingerprint

# The project's own open_clip architectures (e.g. ``ldm-small-text``, the demo's random-init
# tower: 2 layers of width 256), registered beside open_clip's so model_name accepts them.
PROJECT_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(PROJECT_MODEL_CONFIGS)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which open_clip text tower to use and where its weights come from.

    Weights come from ``weights_file`` when it is set (no download), else from the open_clip
    ``pretrained`` tag (downloaded once into the Hugging Face cache), else — ``pretrained: null``
    — from a random initialisation seeded by ``seed``, which the demo and the tests use because
    they cannot download anything.

    ``clip_skip`` leaves out the last N transformer blocks (diffusers' ``clip_skip``; SD 2 uses
    the penultimate layer, N = 1): the hidden states after block L - N, then the final layer norm.
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    weights_file: Path | None = None
    max_length: int = 77
    seed: int = 0
    clip_skip: int = 0

    def __post_init__(self) -> None:
        if self.weights_file is not None:
            object.__setattr__(self, "weights_file", Path(self.weights_file))
        if self.model_name not in open_clip.list_models():
            raise ValueError(
                f"text_encoder.model_name={self.model_name!r} is not an open_clip model. "
                "Pick one of open_clip.list_models(), e.g. ViT-B-32."
            )
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(
                f"text_encoder.max_length must be an integer of at least 2 (start and end "
                f"tokens), got {self.max_length!r}."
            )
        if not isinstance(self.clip_skip, int) or self.clip_skip < 0:
            raise ValueError(
                f"text_encoder.clip_skip must be a non-negative integer (0 uses every layer), "
                f"got {self.clip_skip!r}."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TextEncoderConfig:
        return dataclass_from_dict(cls, values, "text_encoder")

    @property
    def is_random_init(self) -> bool:
        return self.weights_file is None and self.pretrained is None

    def describe_weights(self) -> str:
        """Where the weights come from, in words, for logs and error messages."""
        if self.weights_file is not None:
            return f"local weights file {self.weights_file}"
        if self.pretrained is not None:
            return f"open_clip pretrained tag {self.pretrained!r}"
        return f"RANDOM initialisation (seed {self.seed})"

    def existing_weights_file(self) -> Path:
        """``weights_file``, refusing a path that is not there with a message saying what to do."""
        if self.weights_file is None or not self.weights_file.is_file():
            raise FileNotFoundError(
                f"text_encoder.weights_file={self.weights_file} does not exist. Point it at an "
                f"open_clip/CLIP checkpoint for {self.model_name} (e.g. the "
                "open_clip_pytorch_model.bin or .safetensors from the Hugging Face hub), or set "
                "it to null to use text_encoder.pretrained."
            )
        return self.weights_file

    def fingerprint(self) -> dict[str, Any]:
        """What determines the hidden states: architecture, token length and exact weights.

        A weights file is identified by its SHA-256 (its path may move); a random init by its
        seed and the open_clip version, whose initialisers could change between releases.
        """
        if self.weights_file is not None:
            weights = f"sha256:{file_fingerprint(self.existing_weights_file())}"
        elif self.pretrained is not None:
            weights = f"open_clip:{self.pretrained}"
        else:
            weights = f"random-init:seed={self.seed}:open_clip={open_clip.__version__}"
        fingerprint = {"model_name": self.model_name, "max_length": self.max_length}
        fingerprint["weights"] = weights
        if self.clip_skip:  # absent at 0, so caches built before the option still match
            fingerprint["clip_skip"] = self.clip_skip
        return fingerprint
