"""Convolutional building blocks shared by the VAE and the U-Net.

Kept free of any training framework so both models read top to bottom as plain PyTorch.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm that fails early, naming the numbers, when the channels can't be split."""
    if channels % groups != 0:
        raise ValueError(
            f"GroupNorm needs channels divisible by groups, got channels={channels}, "
            f"groups={groups}. Pick channel counts that are multiples of {groups} "
            "or lower the number of norm groups."
        )
    return nn.GroupNorm(num_groups=groups, num_channels=channels)


class ResnetBlock(nn.Module):
    """Two norm–SiLU–conv stages on a residual path, so deep stacks stay easy to optimise.

    With `time_emb_ch` set, a projected time embedding is added after the first conv: a
    per-channel shift is how the U-Net tells every block which noise level it is denoising.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        time_emb_ch: int | None = None,
        dropout: float = 0.0,
        groups: int = 32,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.time_proj = nn.Linear(time_emb_ch, out_ch) if time_emb_ch is not None else None
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        # A 1×1 conv only where the residual must change width; otherwise the identity.
        self.skip = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, time_emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        if self.time_proj is not None:
            if time_emb is None:
                raise ValueError(
                    "This ResnetBlock was built with time_emb_ch and needs a time embedding; "
                    "pass time_emb of shape (B, time_emb_ch)."
                )
            shift = self.time_proj(F.silu(time_emb))  # (B, out_ch)
            h = h + rearrange(shift, "b c -> b c 1 1")
        elif time_emb is not None:
            raise ValueError(
                "Got a time embedding but this ResnetBlock was built without time_emb_ch; "
                "build it with time_emb_ch=<embedding width> to condition on time."
            )
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halves height and width with a learned stride-2 conv rather than a fixed pooling."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, H, W) -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Doubles height and width: nearest-neighbour then a conv, which avoids the
    checkerboard artefacts of transposed convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class SelfAttention2d(nn.Module):
    """Residual self-attention over all pixels of a feature map.

    Convolutions only see a small neighbourhood; one attention layer at low resolution lets
    every position use global context at a cost of (H·W)² that stays small there.
    """

    def __init__(self, channels: int, groups: int = 32, heads: int = 1) -> None:
        super().__init__()
        if channels % heads != 0:
            raise ValueError(
                f"SelfAttention2d needs channels divisible by heads, got channels={channels}, "
                f"heads={heads}. Choose a head count that divides the channel count."
            )
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        qkv = self.to_qkv(self.norm(x))  # (B, 3C, H, W)
        q, k, v = rearrange(
            qkv, "b (three heads d) h w -> three b heads (h w) d", three=3, heads=self.heads
        ).unbind(0)  # each (B, heads, HW, C/heads)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        attended = rearrange(attended, "b heads (h w) d -> b (heads d) h w", h=height, w=width)
        return x + self.proj_out(attended)


def sinusoidal_timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Timesteps (B,) -> (B, dim) sines and cosines at geometrically spaced frequencies.

    A raw integer is a poor network input; sinusoids give every noise level a distinct,
    smoothly varying code (as for token positions in a Transformer). Fractional `t` works,
    which continuous-time samplers need. Always float32: low-precision `t·freq` would merge
    neighbouring timesteps.
    """
    if dim % 2 != 0:
        raise ValueError(
            f"The sinusoidal timestep embedding needs an even width, got dim={dim}; "
            "it is split evenly into sines and cosines."
        )
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
    frequencies = torch.exp(-math.log(max_period) * exponents)  # (dim/2,) from 1 to ~1/max_period
    angles = rearrange(t.float(), "b -> b 1") * rearrange(frequencies, "f -> 1 f")  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Timesteps (B,) -> (B, embed_dim): sinusoidal code, then a two-layer MLP.

    The MLP lets the network learn which features of the noise level each block needs;
    every `ResnetBlock` then projects this one shared embedding for itself.
    """

    def __init__(self, sinusoid_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.sinusoid_dim = sinusoid_dim
        self.linear_in = nn.Linear(sinusoid_dim, embed_dim)
        self.linear_out = nn.Linear(embed_dim, embed_dim)

    def forward(self, t: Tensor) -> Tensor:
        code = sinusoidal_timestep_embedding(t, self.sinusoid_dim)  # (B, sinusoid_dim) float32
        # Match the weights' dtype so a model cast to bf16 as a whole still runs.
        hidden = F.silu(self.linear_in(code.to(self.linear_in.weight.dtype)))
        return self.linear_out(hidden)  # (B, embed_dim)
