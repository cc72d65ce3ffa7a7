"""Stage-2 denoiser: a text-conditional U-Net over VAE latents.

`UNet(x_t, t, context)` predicts the noise (or v) in a noisy latent; it is the plain callable
that `ldm.diffusion` expects. Time enters every residual block as a learned per-channel shift;
the caption enters through cross-attention in the transformer blocks at the lower resolutions
and in the middle, where attention over all positions is cheap.
"""

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.config.parse import dataclass_from_dict
from ldm.models.attention import SpatialTransformer
from ldm.models.blocks import Downsample, ResnetBlock, TimestepEmbedding, Upsample, group_norm
from ldm.models.conditioning import TextPooling, checked_conditioning
from ldm.models.text_refiner import TextRefiner, check_text_refiner


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a U-Net; it round-trips through JSON with its weights.

    `channel_multipliers` gives one resolution level per entry (width = multiplier ×
    `model_channels`) with a 2× downsampling between consecutive levels. `transformer_levels`
    lists the level indices (0 = full latent resolution) whose residual blocks are each followed
    by a transformer block; the middle block always has one. Attention heads have a fixed width
    (`attention_head_dim`), so wider levels get more heads.

    The defaults (22.7M parameters) are the COCO run: 16×16 latents processed at 16, 8 and 4
    cells per side; narrow at full resolution, where convolutions are costliest, and text
    cross-attention at 8×8 and 4×4.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 3, 3)
    res_blocks_per_level: int = 2
    transformer_levels: tuple[int, ...] = (1, 2)
    transformer_depth: int = 1
    attention_head_dim: int = 32
    context_dim: int = 512
    dropout: float = 0.0
    norm_groups: int = 32
    pooled_text: bool = False
    text_refiner_layers: int = 0

    def __post_init__(self) -> None:
        # Accept lists from JSON/Hydra but store tuples so the config stays hashable.
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        object.__setattr__(self, "transformer_levels", tuple(self.transformer_levels))
        for name in (
            "in_channels",
            "out_channels",
            "model_channels",
            "res_blocks_per_level",
            "transformer_depth",
            "attention_head_dim",
            "context_dim",
            "norm_groups",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}.")
        if not self.channel_multipliers or any(
            not isinstance(m, int) or m < 1 for m in self.channel_multipliers
        ):
            raise ValueError(
                f"UNetConfig.channel_multipliers must be a non-empty list of positive integers, "
                f"got {list(self.channel_multipliers)}."
            )
        if self.model_channels % self.norm_groups != 0:
            raise ValueError(
                f"UNetConfig.model_channels={self.model_channels} is not a multiple of "
                f"norm_groups={self.norm_groups}; GroupNorm needs every width (multiples of "
                "model_channels, and their concatenations at the skips) divisible by the groups."
            )
        if self.model_channels % 2 != 0:
            raise ValueError(
                f"UNetConfig.model_channels must be even (it is the sinusoidal timestep code's "
                f"width), got {self.model_channels}."
            )
        levels = range(len(self.channel_multipliers))
        outside = [level for level in self.transformer_levels if level not in levels]
        if outside:
            raise ValueError(
                f"UNetConfig.transformer_levels {list(self.transformer_levels)} names levels "
                f"{outside} that do not exist; valid levels are 0..{len(levels) - 1} "
                f"(one per channel multiplier, 0 = full resolution)."
            )
        widths = [self.model_channels * m for m in self.channel_multipliers]
        attended = [widths[level] for level in self.transformer_levels] + [widths[-1]]
        indivisible = sorted({w for w in attended if w % self.attention_head_dim != 0})
        if indivisible:
            raise ValueError(
                f"UNetConfig.attention_head_dim={self.attention_head_dim} does not divide the "
                f"transformer widths {indivisible}; pick a head dimension that divides them."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.pooled_text and self.attended_context_dim % self.attention_head_dim != 0:
            raise ValueError(
                f"UNetConfig.pooled_text pools the text with attention heads of width "
                f"attention_head_dim={self.attention_head_dim}, which must divide "
                f"context_dim={self.context_dim}."
            )
        check_text_refiner("UNetConfig", self.text_refiner_layers)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "UNetConfig":
        return dataclass_from_dict(cls, values, "model.unet")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (tuples become lists)."""
        values = asdict(self)
        values["channel_multipliers"] = list(self.channel_multipliers)
        values["transformer_levels"] = list(self.transformer_levels)
        return values

    @property
    def attended_context_dim(self) -> int:
        """Width of the text states cross-attention reads: the encoder's, or with a text
        refiner the middle block's width, at which the refiner works."""
        if self.text_refiner_layers:
            return self.model_channels * self.channel_multipliers[-1]
        return self.context_dim

    @property
    def downsample_factor(self) -> int:
        """Latent cells per lowest-resolution cell along each side; latent sizes must divide."""
        return 2 ** (len(self.channel_multipliers) - 1)


class ConditionedBlock(nn.Module):
    """A residual block conditioned on time, optionally followed by a transformer block
    conditioned on the text: the unit the U-Net stacks at every position."""

    def __init__(
        self, in_ch: int, out_ch: int, *, config: UNetConfig, time_emb_ch: int, transformer: bool
    ) -> None:
        super().__init__()
        self.resnet = ResnetBlock(
            in_ch,
            out_ch,
            time_emb_ch=time_emb_ch,
            dropout=config.dropout,
            groups=config.norm_groups,
        )
        self.transformer = (
            SpatialTransformer(
                out_ch,
                context_dim=config.attended_context_dim,
                head_dim=config.attention_head_dim,
                depth=config.transformer_depth,
                dropout=config.dropout,
                groups=config.norm_groups,
            )
            if transformer
            else None
        )

    def forward(
        self, x: Tensor, time_emb: Tensor, context: Tensor, context_mask: Tensor | None
    ) -> Tensor:
        h = self.resnet(x, time_emb)  # (B, out_ch, H, W)
        if self.transformer is not None:
            h = self.transformer(h, context, context_mask)
        return h


class UNetLevel(nn.Module):
    """The blocks of one resolution level and the resampling that leaves it.

    Only a container: `UNet.forward` walks it, because the skip connections span levels.
    """

    def __init__(self, blocks: list[ConditionedBlock], resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class UNet(nn.Module):
    """(x_t (B, C, h, w), t (B,), context (B, L, context_dim)) -> (B, C, h, w).

    Encoder levels halve the resolution and save every intermediate map; decoder levels
    concatenate them back in reverse order (skip connections by concatenation), so the fine
    detail of the noisy latent never has to pass through the bottleneck.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.model_channels * m for m in config.channel_multipliers]
        last_level = len(widths) - 1
        # 4× the base width, as in the DDPM/ADM U-Nets.
        time_emb_ch = 4 * config.model_channels
        self.time_embedding = TimestepEmbedding(config.model_channels, time_emb_ch)
        self.text_refiner = TextRefiner(
            config.context_dim,
            width=config.attended_context_dim,
            layers=config.text_refiner_layers,
            head_dim=config.attention_head_dim,
            dropout=config.dropout,
        )
        self.text_pooling = (
            TextPooling(config.attended_context_dim, time_emb_ch, config.attention_head_dim)
            if config.pooled_text
            else None
        )

        def block(in_ch: int, out_ch: int, level: int) -> ConditionedBlock:
            return ConditionedBlock(
                in_ch,
                out_ch,
                config=config,
                time_emb_ch=time_emb_ch,
                transformer=level in config.transformer_levels,
            )

        self.conv_in = nn.Conv2d(config.in_channels, widths[0], kernel_size=3, padding=1)
        skip_widths = [widths[0]]
        self.down_levels = nn.ModuleList()
        channels = widths[0]
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(config.res_blocks_per_level):
                blocks.append(block(channels, width, level))
                channels = width
                skip_widths.append(channels)
            downsample = Downsample(channels) if level < last_level else None
            if downsample is not None:
                skip_widths.append(channels)
            self.down_levels.append(UNetLevel(blocks, downsample))

        # Resnet, transformer, resnet. The middle always attends: at the lowest resolution
        # attention over all positions is cheapest.
        self.middle = nn.ModuleList(
            ConditionedBlock(
                channels, channels, config=config, time_emb_ch=time_emb_ch, transformer=attends
            )
            for attends in (True, False)
        )

        self.up_levels = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = []
            # One block more than on the way down: it consumes the skip saved before the
            # downsampling (or from conv_in at level 0).
            for _ in range(config.res_blocks_per_level + 1):
                blocks.append(block(channels + skip_widths.pop(), widths[level], level))
                channels = widths[level]
            upsample = Upsample(channels) if level > 0 else None
            self.up_levels.append(UNetLevel(blocks, upsample))

        self.norm_out = group_norm(channels, config.norm_groups)
        self.conv_out = nn.Conv2d(channels, config.out_channels, kernel_size=3, padding=1)
        # Zero-initialised: the untrained U-Net predicts exactly 0, and every residual path
        # starts from a well-defined point instead of adding random noise to the prediction.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

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
        context = self.text_refiner(context, context_mask)  # (B, L, attended_context_dim)
        time_emb = self.time_embedding(t)  # (B, 4·model_channels)
        if self.text_pooling is not None:
            time_emb = time_emb + self.text_pooling(context, context_mask)

        h = self.conv_in(x)  # (B, c0, h, w)
        skips = [h]
        for level in self.down_levels:
            for block in level.blocks:
                h = block(h, time_emb, context, context_mask)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, c, H/2, W/2)
                skips.append(h)

        for block in self.middle:
            h = block(h, time_emb, context, context_mask)  # (B, c_last, h/f, w/f)

        for level in self.up_levels:
            for block in level.blocks:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, c + c_skip, H, W)
                h = block(h, time_emb, context, context_mask)
            if level.resample is not None:
                h = level.resample(h)  # (B, c, 2H, 2W)

        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, h, w)

    def _check_inputs(
        self, x: Tensor, t: Tensor | float, context: Tensor, context_mask: Tensor | None
    ) -> Tensor:
        """Refuse malformed inputs with a message that says what to pass; returns t as (B,)."""
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(
                f"UNet expects latents of shape (B, {config.in_channels}, h, w), got "
                f"{tuple(x.shape)}. Pass latents from the VAE this U-Net was configured for."
            )
        height, width = x.shape[2], x.shape[3]
        factor = config.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"UNet needs latent height and width divisible by {factor} (2 per level below "
                f"the first), got {height}×{width}. Use latents whose sides are multiples of "
                f"{factor}, or fewer channel_multipliers."
            )
        return checked_conditioning(
            "UNet", x, t, context, context_mask, context_dim=config.context_dim
        )
