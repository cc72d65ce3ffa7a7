"""Stage-1 β-VAE: compresses images 8× per side into a small Gaussian latent.

The diffusion model later works in this latent space, so the VAE's only jobs are faithful
reconstruction and a latent that stays close to N(0, I) (a light KL penalty, not a prior).
"""

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.config.parse import dataclass_from_dict
from ldm.models.blocks import Downsample, ResnetBlock, SelfAttention2d, Upsample, group_norm


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a VAE; it round-trips through JSON with its weights.

    `block_channels` gives one resolution level per entry with a 2× downsampling between
    consecutive levels, so four entries compress 128 px to 16 px.
    """

    in_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (64, 128, 256, 256)
    layers_per_block: int = 2
    mid_attention: bool = True
    norm_groups: int = 32
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    def __post_init__(self) -> None:
        # Accept lists from JSON/Hydra but store a tuple so the config stays hashable.
        object.__setattr__(self, "block_channels", tuple(self.block_channels))
        for name in ("in_channels", "latent_channels", "layers_per_block", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive integer, got {value!r}.")
        if not self.block_channels:
            raise ValueError("VAEConfig.block_channels is empty; give at least one level.")
        uneven = [ch for ch in self.block_channels if ch < 1 or ch % self.norm_groups != 0]
        if uneven:
            raise ValueError(
                f"VAEConfig.block_channels {list(self.block_channels)} has entries {uneven} that "
                f"are not positive multiples of norm_groups={self.norm_groups}; GroupNorm needs "
                "every width divisible by the group count."
            )
        if not self.logvar_min < self.logvar_max:
            raise ValueError(
                f"VAEConfig needs logvar_min < logvar_max, got {self.logvar_min} and "
                f"{self.logvar_max}."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VAEConfig":
        return dataclass_from_dict(cls, values, "model.vae")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (tuples become lists)."""
        values = asdict(self)
        values["block_channels"] = list(self.block_channels)
        return values


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))) returned by the encoder.

    The log-variance is clamped because an untrained encoder can emit extreme values whose
    exp() overflows or underflows and turns the KL into inf/NaN.
    """

    def __init__(
        self, mean: Tensor, logvar: Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0
    ) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(
                f"mean and logvar must have the same shape, got {tuple(mean.shape)} and "
                f"{tuple(logvar.shape)}."
            )
        self.mean = mean
        self.logvar = logvar.clamp(logvar_min, logvar_max)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(
        self, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """z = mean + std·ε, for the given ε or one drawn on the generator's own device (so one
        seeded CPU generator gives the same z whether the model runs on CPU or GPU)."""
        if noise is None:
            noise_device = generator.device if generator is not None else self.mean.device
            noise = torch.randn(
                self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype
            )
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over all latent dimensions: (B,).

        Computed in float32 so a bf16 autocast run doesn't lose precision in the sum.
        """
        mean, logvar = self.mean.float(), self.logvar.float()
        kl_per_dim = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)  # (B, C, h, w)
        return kl_per_dim.flatten(start_dim=1).sum(dim=1)  # (B,)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> posterior parameters (B, 2·latent_channels, H/f, W/f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        groups = config.norm_groups
        channels = config.block_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)

        self.levels = nn.ModuleList()
        level_in = channels[0]
        for level, level_out in enumerate(channels):
            stage = nn.Sequential()
            for _ in range(config.layers_per_block):
                stage.append(ResnetBlock(level_in, level_out, groups=groups))
                level_in = level_out
            if level < len(channels) - 1:
                stage.append(Downsample(level_out))
            self.levels.append(stage)

        self.mid = _middle_block(channels[-1], groups, config.mid_attention)
        self.norm_out = group_norm(channels[-1], groups)
        self.conv_out = nn.Conv2d(
            channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, c0, H, W)
        for stage in self.levels:
            h = stage(h)  # last level: (B, c_last, H/f, W/f)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2·latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, in_channels, h·f, w·f).

    Mirrors the encoder but with one extra ResnetBlock per level: decoding detail is the
    harder direction, and the encoder runs only once per image for the latent cache.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        groups = config.norm_groups
        channels = config.block_channels
        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], kernel_size=3, padding=1)
        self.mid = _middle_block(channels[-1], groups, config.mid_attention)

        self.levels = nn.ModuleList()
        level_in = channels[-1]
        for level in reversed(range(len(channels))):
            level_out = channels[level]
            stage = nn.Sequential()
            for _ in range(config.layers_per_block + 1):
                stage.append(ResnetBlock(level_in, level_out, groups=groups))
                level_in = level_out
            if level > 0:
                stage.append(Upsample(level_out))
            self.levels.append(stage)

        self.norm_out = group_norm(channels[0], groups)
        self.conv_out = nn.Conv2d(channels[0], config.in_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, c_last, h, w)
        for stage in self.levels:
            h = stage(h)  # last level: (B, c0, h·f, w·f)
        # No tanh: an unbounded output keeps gradients alive at the extremes; MSE pulls it
        # towards the [-1, 1] targets, and conversion to pixels clamps.
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, in_channels, h·f, w·f)


def _middle_block(channels: int, groups: int, with_attention: bool) -> nn.Sequential:
    """Resnet, optional global self-attention, resnet: the lowest-resolution processing."""
    middle = nn.Sequential(ResnetBlock(channels, channels, groups=groups))
    if with_attention:
        middle.append(SelfAttention2d(channels, groups=groups))
    middle.append(ResnetBlock(channels, channels, groups=groups))
    return middle


class VAE(nn.Module):
    """Encoder + decoder built from a `VAEConfig`, which stays attached for export."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.config.block_channels) - 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        self._check_images(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # each (B, latent, H/f, W/f)
        return DiagonalGaussian(mean, logvar, self.config.logvar_min, self.config.logvar_max)

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"VAE.decode expects latents of shape (B, {self.config.latent_channels}, h, w), "
                f"got {tuple(z.shape)}. Pass latents produced by this VAE's encoder."
            )
        return self.decoder(z)

    def forward(
        self,
        x: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct `x`; sampling z (the default) is what makes this a VAE in training.
        `noise` is the ε of that sample when the caller has drawn it already."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _check_images(self, x: Tensor) -> None:
        expected_channels = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != expected_channels:
            raise ValueError(
                f"VAE.encode expects images of shape (B, {expected_channels}, H, W), got "
                f"{tuple(x.shape)}. Check the data transform's channel count and batching."
            )
        height, width = x.shape[-2:]
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"VAE.encode needs height and width divisible by {factor} (the downsample "
                f"factor), got {height}×{width}. Resize or crop images to a multiple of {factor}."
            )


def vae_loss(
    reconstruction: Tensor, target: Tensor, posterior: DiagonalGaussian, kl_weight: float
) -> dict[str, Tensor]:
    """β-VAE objective: total = recon + kl_weight · kl.

    Normalisation (β is calibrated against exactly this; change it and β=1e-5 means
    something else):
      - recon: squared error averaged over every pixel, channel and sample;
      - kl: KL to N(0, I) summed over all latent dimensions, then averaged over the batch.
    """
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} "
            "must have the same shape."
        )
    recon = F.mse_loss(reconstruction.float(), target.float())
    kl = posterior.kl().mean()
    return {"recon": recon, "kl": kl, "total": recon + kl_weight * kl}


def count_parameters(module: nn.Module) -> int:
    """All parameters, trainable or not, for logging model size."""
    return sum(parameter.numel() for parameter in module.parameters())
