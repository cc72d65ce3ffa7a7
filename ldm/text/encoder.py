"""The frozen open_clip text encoder whose per-token hidden states the U-Net cross-attends to.

Frozen means three things here: no gradients, eval mode forever (a parent's ``.train()`` cannot
switch it back), and no place in a parent's ``state_dict``. The last one is chosen over keeping
the encoder outside the parent's children: as a registered child it still moves with the parent
(``.to(device)``, Lightning), yet U-Net checkpoints stay free of its 63M parameters, because its
weights are fully described by :meth:`FrozenTextEncoder.config_fingerprint` and are rebuilt from
the config, never from a checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from ldm.text.config import TextEncoderConfig
from ldm.text.loading import load_text_tower
from ldm.text.quiet import open_clip_chatter_dropped

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEmbedding:
    """One batch of encoded prompts."""

    hidden_states: Tensor  # (B, max_length, width): after the final layer norm
    pooled: Tensor  # (B, embed_dim): the projected end-of-text features CLIP aligns with images
    token_lengths: Tensor  # (B,) tokens including start and end markers, at most max_length


class FrozenTextEncoder(nn.Module):
    """Prompts → CLIP text hidden states, computed without gradients in float32.

    The causal attention mask of CLIP's text transformer means position i only sees tokens
    0..i, so the first n hidden states of a prompt are the same whether n or all
    ``max_length`` positions are computed: :meth:`encode_hidden_states` exploits this to cache
    and sample with a shorter context at a fraction of the cost.
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = load_text_tower(config)
        context_length = self.model.positional_embedding.shape[0]
        if config.max_length > context_length:
            raise ValueError(
                f"text_encoder.max_length={config.max_length} exceeds the {context_length} "
                f"positions {config.model_name} was built with; use at most {context_length}."
            )
        if self.model.attn_mask is None:
            raise ValueError(
                f"{config.model_name}'s text transformer is not causal; the cached, truncated "
                "hidden states this project relies on need a causal one (e.g. ViT-B-32)."
            )
        num_layers = len(self.model.transformer.resblocks)
        if config.clip_skip > num_layers:
            raise ValueError(
                f"text_encoder.clip_skip={config.clip_skip} skips more than the {num_layers} "
                f"transformer blocks of {config.model_name}; use 0..{num_layers} ({num_layers} "
                "keeps only the word and position embeddings)."
            )
        self._blocks_used = num_layers - config.clip_skip
        with open_clip_chatter_dropped():
            tokenizer = open_clip.get_tokenizer(config.model_name)
        if not isinstance(tokenizer, open_clip.SimpleTokenizer):
            raise ValueError(
                f"{config.model_name} uses a {type(tokenizer).__name__}; this encoder supports "
                "models with CLIP's bundled BPE tokenizer (it works offline), e.g. ViT-B-32."
            )
        self._tokenizer = tokenizer
        self._empty_prompt_hidden_states: Tensor | None = None
        self.register_state_dict_post_hook(_leave_out_of_state_dict)
        self.register_load_state_dict_pre_hook(_keep_own_weights_on_load)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Stay in eval mode whatever a parent asks (as CompVis locks its frozen models)."""
        return super().train(False)

    @property
    def width(self) -> int:
        """Size of each token's hidden state: the U-Net's cross-attention context dimension."""
        return int(self.model.ln_final.normalized_shape[0])

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def device(self) -> torch.device:
        return self.model.positional_embedding.device

    def config_fingerprint(self) -> dict[str, Any]:
        """What determines this encoder's outputs; caches of hidden states are keyed by it."""
        return self.config.fingerprint()

    def token_count(self, prompt: str) -> int:
        """Tokens in ``prompt`` including start and end markers, before any truncation."""
        return len(self._tokenizer.encode(prompt)) + 2

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids (B, max_length), zero-padded; longer prompts are cut with a warning.

        Truncation keeps the end-of-text marker in the last position, exactly as open_clip does.
        """
        prompts = _checked(prompts)
        tokens = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        truncated = 0
        for row, prompt in enumerate(prompts):
            ids = [self._tokenizer.sot_token_id, *self._tokenizer.encode(prompt)]
            if len(ids) >= self.max_length:
                truncated += 1
                ids = ids[: self.max_length - 1]
            ids.append(self._tokenizer.eot_token_id)
            tokens[row, : len(ids)] = torch.tensor(ids)
        if truncated:
            log.warning(
                "%d of %d prompts are longer than text_encoder.max_length=%d tokens and were "
                "truncated; the text beyond that is ignored.",
                truncated,
                len(prompts),
                self.max_length,
            )
        return tokens

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """Hidden states of every position, the pooled embedding and each prompt's length."""
        tokens = self.tokenize(prompts).to(self.device)
        hidden_states = self._hidden_states(tokens)  # (B, max_length, width)
        pooled = text_global_pool(
            hidden_states, tokens, self.model.text_pool_type, eos_token_id=self.model.text_eos_id
        )  # (B, width)
        projection = self.model.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)
        elif projection is not None:
            pooled = pooled @ projection  # (B, embed_dim)
        token_lengths = (tokens == self._tokenizer.eot_token_id).int().argmax(dim=1) + 1
        return TextEmbedding(hidden_states, pooled, token_lengths.cpu())

    @torch.no_grad()
    def encode_hidden_states(self, prompts: Sequence[str], num_positions: int) -> Tensor:
        """The first ``num_positions`` hidden states (B, num_positions, width), computed alone.

        Equal (up to float rounding) to ``encode(prompts).hidden_states[:, :num_positions]``
        but costs num_positions / max_length of it; what the caches store and sampling reuses.
        """
        if not 1 <= num_positions <= self.max_length:
            raise ValueError(
                f"num_positions must be in 1..{self.max_length} (text_encoder.max_length), "
                f"got {num_positions}."
            )
        tokens = self.tokenize(prompts).to(self.device)
        return self._hidden_states(tokens[:, :num_positions])

    def empty_prompt_hidden_states(self) -> Tensor:
        """Hidden states (1, max_length, width) of the empty prompt, for classifier-free
        guidance: computed once, then reused on whatever device the encoder is on."""
        if self._empty_prompt_hidden_states is None:
            self._empty_prompt_hidden_states = self.encode([""]).hidden_states.cpu()
        return self._empty_prompt_hidden_states.to(self.device)

    def _hidden_states(self, tokens: Tensor) -> Tensor:
        """Token ids (B, n) → hidden states (B, n, width) for the first n positions, in float32
        whatever autocast the caller runs under, so cached and live embeddings agree."""
        num_positions = tokens.shape[1]
        model = self.model
        with torch.autocast(self.device.type, enabled=False):
            x = model.token_embedding(tokens)  # (B, n, width)
            x = x + model.positional_embedding[:num_positions]
            causal_mask = model.attn_mask[:num_positions, :num_positions]  # (n, n)
            transformer = model.transformer
            if not transformer.batch_first:
                x = x.transpose(0, 1)  # (n, B, width)
            for block in transformer.resblocks[: self._blocks_used]:  # clip_skip leaves the rest
                x = block(x, attn_mask=causal_mask)
            if not transformer.batch_first:
                x = x.transpose(0, 1)
            return model.ln_final(x)  # (B, n, width)


def _checked(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(
            f"prompts must be a list of strings, got {type(prompts).__name__}; wrap a single "
            'prompt in a list: encode(["a red circle"]).'
        )
    return list(prompts)


def _leave_out_of_state_dict(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """state_dict post-hook: drop every entry of this encoder (rebuilt from config instead)."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        del state_dict[key]


def _keep_own_weights_on_load(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """load_state_dict pre-hook: a parent's checkpoint holds none of this encoder's weights, so
    supply the current ones (and override any stale copy), keeping strict loading strict for
    everything else."""
    for name, value in nn.Module.state_dict(module.model).items():
        state_dict[f"{prefix}model.{name}"] = value
