"""Plain PyTorch models: the Stage-1 VAE and the blocks it shares with the U-Net."""

from ldm.models.vae import VAE, DiagonalGaussian, VAEConfig, count_parameters, vae_loss

__all__ = ["VAE", "DiagonalGaussian", "VAEConfig", "count_parameters", "vae_loss"]
