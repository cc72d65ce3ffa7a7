"""The frozen open_clip text encoder: prompts → per-token hidden states for cross-attention."""

from ldm.text.config import TextEncoderConfig
from ldm.text.encoder import FrozenTextEncoder, TextEmbedding
from ldm.text.loading import TextEncoderWeightsUnavailableError

__all__ = [
    "FrozenTextEncoder",
    "TextEmbedding",
    "TextEncoderConfig",
    "TextEncoderWeightsUnavailableError",
]
