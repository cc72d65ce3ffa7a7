"""Stage-2 denoiser, transformer version: a DiT over patches of the VAE latents.

`DiT(x_t, t, context)` takes and returns what `UNet` does, so training, EMA, exports and
sampling use either (`model.denoiser`). The latent is cut into patches (2×2 cells: 64 tokens on
16×16 latents), each a token with a fixed 2D sine-cosine position code; a stack of identical
blocks refines the tokens and a linear layer turns each back into its patch.

Conditioning, after DiT (Peebles & Xie 2023) and PixArt-α (Chen et al. 2023):
- the timestep modulates every block through adaLN-Zero: from its embedding each block computes
  the shift and scale of its LayerNorms and a gate on each residual branch. The gates and the
  cross-attention's output start at zero, so every block starts as the identity and the
  untrained model predicts exactly zero, as the U-Net does;
- the caption enters by cross-attention to the cached text hidden states, between
  self-attention and the MLP. Unlike SD3's joint attention (MM-DiT) this leaves the cached
  states as they are, keeps the image's token count fixed, and needs no second stack of text
  weights, which at ~20M parameters would be a third of the model. With `pooled_text` the
  caption also enters as one attention-pooled vector added to the timestep embedding, so it
  sets every block's adaLN as a class label does in DiT.
"""

from dataclasses import asdict, dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from ldm.config.parse import dataclass_from_dict
from ldm.models.attention import GEGLUFeedForward, MultiHeadAttention
from ldm.models.blocks import TimestepEmbedding, sinusoidal_timestep_embedding
from ldm.models.conditioning import TextPooling, checked_conditioning
from ldm.models.text_refiner import TextRefiner, check_text_refiner


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to rebuild a DiT; it round-trips through JSON with its weights.

    Every block has width `hidden_dim` and `hidden_dim / attention_head_dim` heads. The model
    takes any latent size divisible by `patch_size` (positions are coded for the grid it gets).
    The defaults (22.4M parameters) are the COCO run: 4×16×16 latents in 2×2 patches, 64 tokens.
    """

    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2
    hidden_dim: int = 256
    depth: int = 12
    attention_head_dim: int = 32
    context_dim: int = 512
    dropout: float = 0.0
    text_refiner_layers: int = 0
    pooled_text: bool = False

    def __post_init__(self) -> None:
        for name in (
            "in_channels",
            "out_channels",
            "patch_size",
            "hidden_dim",
            "depth",
            "attention_head_dim",
            "context_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiTConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_dim % self.attention_head_dim != 0:
            raise ValueError(
                f"DiTConfig.hidden_dim={self.hidden_dim} is not divisible by "
                f"attention_head_dim={self.attention_head_dim}; the heads split the width "
                "evenly: pick a head dimension that divides it."
            )
        if self.hidden_dim % 4 != 0:
            raise ValueError(
                f"DiTConfig.hidden_dim must be a multiple of 4, got {self.hidden_dim}: the 2D "
                "position code gives each axis half the width, split into sines and cosines."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DiTConfig.dropout must be in [0, 1), got {self.dropout}.")
        check_text_refiner("DiTConfig", self.text_refiner_layers)
        if self.pooled_text and self.attended_context_dim % self.attention_head_dim != 0:
            raise ValueError(
                f"DiTConfig.pooled_text pools the text with attention heads of width "
                f"attention_head_dim={self.attention_head_dim}, which must divide "
                f"context_dim={self.context_dim}."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DiTConfig":
        return dataclass_from_dict(cls, values, "model.dit")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def attended_context_dim(self) -> int:
        """Width of the text states cross-attention reads: the encoder's, or with a text
        refiner the blocks' own width, at which the refiner works."""
        return self.hidden_dim if self.text_refiner_layers else self.context_dim

    @property
    def downsample_factor(self) -> int:
        """Latent cells per token along each side; latent sizes must divide (as the U-Net's)."""
        return self.patch_size


def position_code_2d(height: int, width: int, dim: int, device: torch.device) -> Tensor:
    """(height·width, dim) fixed sine-cosine code of each cell of a grid, in row-major order:
    the first half of the width codes the row, the second the column (as in MAE and DiT).

    Fixed rather than learned, so one model serves any grid size."""
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (hw,)
    columns = torch.arange(width, device=device).repeat(height)  # (hw,)
    # The same sinusoids that code a timestep code a position along one axis.
    return torch.cat(
        [
            sinusoidal_timestep_embedding(rows, dim // 2),
            sinusoidal_timestep_embedding(columns, dim // 2),
        ],
        dim=-1,
    )  # (hw, dim) float32


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: normalised tokens x (B, N, D) shifted and scaled per sample by (B, 1, D) tensors;
    `1 + scale`, so that a zero modulation leaves x as it is."""
    return x * (1 + scale) + shift


def zero_init(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to the text, MLP; each pre-normed and residual.

    The timestep embedding sets the shift and scale of the normalisation before self-attention
    and before the MLP, and a gate on each of the two branches (adaLN-Zero). The cross-attention
    branch is not modulated (as in PixArt-α: the caption is the same at every noise level); its
    output projection starts at zero instead.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, head_dim = config.hidden_dim, config.attention_head_dim
        # No affine parameters where adaLN supplies the shift and scale.
        self.norm_self = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attention = MultiHeadAttention(
            dim, context_dim=None, head_dim=head_dim, dropout=config.dropout
        )
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attention = MultiHeadAttention(
            dim,
            context_dim=config.attended_context_dim,
            head_dim=head_dim,
            dropout=config.dropout,
        )
        zero_init(self.cross_attention.to_out[0])
        self.norm_ff = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.feed_forward = GEGLUFeedForward(dim, dropout=config.dropout)
        # Zero: every gate is closed, so the block starts as the identity and learns how much
        # of each branch to let through at each noise level.
        self.modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 6 * dim)))

    def forward(
        self, x: Tensor, time_emb: Tensor, context: Tensor, context_mask: Tensor | None
    ) -> Tensor:
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = rearrange(
            self.modulation(time_emb), "b (six d) -> six b 1 d", six=6
        )  # each (B, 1, D)
        h = modulate(self.norm_self(x), shift_sa, scale_sa)
        x = x + gate_sa * self.self_attention(h)
        x = x + self.cross_attention(self.norm_cross(x), context, context_mask)
        h = modulate(self.norm_ff(x), shift_ff, scale_ff)
        return x + gate_ff * self.feed_forward(h)  # (B, N, D)


class DiT(nn.Module):
    """(x_t (B, C, h, w), t (B,), context (B, L, context_dim)) -> (B, C, h, w), like `UNet`.

    Patchify, add positions, `depth` blocks, a last adaLN and a linear layer to patches,
    unpatchify. With h = w = 16 and patch 2 every block attends over 64 tokens.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim, patch = config.hidden_dim, config.patch_size
        # A conv whose kernel is its stride: one linear map of each patch's cells to a token.
        self.patchify = nn.Conv2d(config.in_channels, dim, kernel_size=patch, stride=patch)
        self.time_embedding = TimestepEmbedding(dim, dim)
        self.text_refiner = TextRefiner(
            config.context_dim,
            width=config.attended_context_dim,
            layers=config.text_refiner_layers,
            head_dim=config.attention_head_dim,
            dropout=config.dropout,
        )
        self.text_pooling = (
            TextPooling(config.attended_context_dim, dim, config.attention_head_dim)
            if config.pooled_text
            else None
        )
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 2 * dim)))
        # Zero-initialised: the untrained DiT predicts exactly 0, as the U-Net does.
        self.to_patches = zero_init(nn.Linear(dim, patch * patch * config.out_channels))

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict the model target for noisy latents `x` at timesteps `t` given text `context`.

        `t` may be a (B,) tensor (integer or fractional timesteps) or one number for the whole
        batch. `context_mask` (B, L), True for real tokens, hides padding from cross-attention.
        """
        t = self._check_inputs(x, t, context, context_mask)
        patch = self.config.patch_size
        rows, columns = x.shape[2] // patch, x.shape[3] // patch
        context = self.text_refiner(context, context_mask)  # (B, L, attended_context_dim)
        time_emb = self.time_embedding(t)  # (B, D)
        if self.text_pooling is not None:
            time_emb = time_emb + self.text_pooling(context, context_mask)

        tokens = rearrange(self.patchify(x), "b d h w -> b (h w) d")  # (B, N = hw/p², D)
        positions = position_code_2d(rows, columns, self.config.hidden_dim, x.device)
        tokens = tokens + positions.to(tokens.dtype)  # (N, D) broadcast over the batch
        for block in self.blocks:
            tokens = block(tokens, time_emb, context, context_mask)  # (B, N, D)

        shift, scale = rearrange(self.modulation_out(time_emb), "b (two d) -> two b 1 d", two=2)
        patches = self.to_patches(modulate(self.norm_out(tokens), shift, scale))  # (B, N, p²C)
        return rearrange(
            patches,
            "b (h w) (p1 p2 c) -> b c (h p1) (w p2)",
            h=rows,
            w=columns,
            p1=patch,
            p2=patch,
        )  # (B, out_channels, h, w)

    def _check_inputs(
        self, x: Tensor, t: Tensor | float, context: Tensor, context_mask: Tensor | None
    ) -> Tensor:
        """Refuse malformed inputs with a message that says what to pass; returns t as (B,)."""
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(
                f"DiT expects latents of shape (B, {config.in_channels}, h, w), got "
                f"{tuple(x.shape)}. Pass latents from the VAE this DiT was configured for."
            )
        height, width = x.shape[2], x.shape[3]
        if height % config.patch_size or width % config.patch_size:
            raise ValueError(
                f"DiT needs latent height and width divisible by patch_size="
                f"{config.patch_size}, got {height}×{width}. Use a patch size that divides "
                "both sides (model.dit.patch_size)."
            )
        return checked_conditioning(
            "DiT", x, t, context, context_mask, context_dim=config.context_dim
        )
