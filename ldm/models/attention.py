"""Transformer blocks that let U-Net feature maps attend to themselves and to text.

Self-attention mixes information across the whole (low-resolution) feature map; cross-attention
is the only place where the caption enters the U-Net. Layout follows Stable Diffusion's
spatial transformer: pre-LayerNorm, self-attention, cross-attention, GEGLU feed-forward.
"""

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.models.blocks import group_norm


class MultiHeadAttention(nn.Module):
    """Queries from `x`, keys and values from `context` (or from `x` itself when it is None).

    Runs through `scaled_dot_product_attention`, which picks a fused kernel (flash or
    memory-efficient) where the device has one.
    """

    def __init__(
        self, query_dim: int, *, context_dim: int | None, head_dim: int, dropout: float
    ) -> None:
        super().__init__()
        if query_dim % head_dim != 0:
            raise ValueError(
                f"Attention width {query_dim} is not divisible by attention_head_dim={head_dim}; "
                "choose a head dimension that divides every width with a transformer block."
            )
        self.heads = query_dim // head_dim
        kv_dim = context_dim if context_dim is not None else query_dim
        # No biases on q, k, v: LayerNorm in front already supplies a learned offset.
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, query_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """x (B, N, query_dim), context (B, L, context_dim), context_mask (B, L) True = attend."""
        source = x if context is None else context
        q = rearrange(self.to_q(x), "b n (heads d) -> b heads n d", heads=self.heads)
        k = rearrange(self.to_k(source), "b l (heads d) -> b heads l d", heads=self.heads)
        v = rearrange(self.to_v(source), "b l (heads d) -> b heads l d", heads=self.heads)
        attn_mask = None if context_mask is None else rearrange(context_mask, "b l -> b 1 1 l")
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        return self.to_out(rearrange(attended, "b heads n d -> b n (heads d)"))


class GEGLUFeedForward(nn.Module):
    """Position-wise MLP with a GELU-gated linear unit (Shazeer 2020), which trains better
    than a plain GELU MLP at the same parameter count."""

    def __init__(self, dim: int, *, hidden_multiplier: int = 4, dropout: float) -> None:
        super().__init__()
        hidden = dim * hidden_multiplier
        self.proj_in = nn.Linear(dim, 2 * hidden)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        values, gates = self.proj_in(x).chunk(2, dim=-1)  # each (B, N, hidden)
        return self.proj_out(self.dropout(values * F.gelu(gates)))  # (B, N, dim)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: self-attention, cross-attention to text, feed-forward."""

    def __init__(self, dim: int, *, context_dim: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attention = MultiHeadAttention(
            dim, context_dim=None, head_dim=head_dim, dropout=dropout
        )
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attention = MultiHeadAttention(
            dim, context_dim=context_dim, head_dim=head_dim, dropout=dropout
        )
        self.norm_ff = nn.LayerNorm(dim)
        self.feed_forward = GEGLUFeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        x = x + self.self_attention(self.norm_self(x))
        x = x + self.cross_attention(self.norm_cross(x), context, context_mask)
        return x + self.feed_forward(self.norm_ff(x))  # (B, N, dim)


class SpatialTransformer(nn.Module):
    """Feature map (B, C, H, W) -> same shape, after `depth` transformer blocks over its pixels.

    The GroupNorm and linear projections in and out adapt the conv features to token form
    and back; the whole block is residual so it starts close to the identity.
    """

    def __init__(
        self,
        channels: int,
        *,
        context_dim: int,
        head_dim: int,
        depth: int,
        dropout: float,
        groups: int,
    ) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, context_dim=context_dim, head_dim=head_dim, dropout=dropout)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, HW, C)
        tokens = self.proj_in(tokens)
        for block in self.blocks:
            tokens = block(tokens, context, context_mask)
        tokens = self.proj_out(tokens)
        return x + rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)
