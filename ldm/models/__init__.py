"""Plain PyTorch models: the Stage-1 VAE, the Stage-2 denoisers (U-Net, DiT) and their blocks."""

from ldm.models.denoiser import DENOISERS, Denoiser, build_denoiser, denoiser_config
from ldm.models.dit import DiT, DiTConfig
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, DiagonalGaussian, VAEConfig, count_parameters, vae_loss

__all__ = [
    "DENOISERS",
    "VAE",
    "Denoiser",
    "DiT",
    "DiTConfig",
    "DiagonalGaussian",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "build_denoiser",
    "count_parameters",
    "denoiser_config",
    "vae_loss",
]
