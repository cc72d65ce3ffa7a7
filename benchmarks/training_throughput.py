"""Training throughput on this machine: VAE images/s and U-Net latents/s, default and demo sizes,
with a same-size diffusers ``UNet2DConditionModel`` measured side by side as the peer.

    .venv/bin/python benchmarks/training_throughput.py [--vae-batch 8] [--unet-batch 32]

Each number times full optimisation steps (forward, loss, backward, AdamW step) on random
inputs after one warm-up step, in one process, one model after the other.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldm.diffusion import NoiseSchedule, ScheduleConfig, diffusion_loss
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, VAEConfig, count_parameters, vae_loss

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
CONTEXT_TOKENS = 32  # the caption cache keeps 32 token positions (cache.text_max_positions)


def configs(experiment: str | None) -> tuple[dict, dict, int]:
    overrides = [f"experiment={experiment}"] if experiment else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train_unet", overrides)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return model["vae"], model["unet"], int(cfg.data.image_size)


def rate(
    model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], batch: int, steps: int
) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def vae_rate(vae_cfg: dict, image_size: int, batch: int, steps: int) -> tuple[int, float]:
    vae = VAE(VAEConfig.from_dict(vae_cfg))
    images = torch.rand(batch, 3, image_size, image_size) * 2 - 1

    def loss() -> torch.Tensor:
        reconstruction, posterior = vae(images)
        return vae_loss(reconstruction, images, posterior, 1e-5)["total"]

    return count_parameters(vae), rate(vae, loss, batch, steps)


def unet_rate(model: torch.nn.Module, latent: int, batch: int, steps: int, peer: bool) -> float:
    schedule = NoiseSchedule(ScheduleConfig())
    z = torch.randn(batch, 4, latent, latent)
    context = torch.randn(batch, CONTEXT_TOKENS, 512)
    call = (lambda x, t, c: model(x, t, encoder_hidden_states=c).sample) if peer else model
    return rate(model, lambda: diffusion_loss(call, schedule, z, context).mean(), batch, steps)


def diffusers_peer(unet_cfg: UNetConfig) -> torch.nn.Module:
    """diffusers' U-Net with the same widths, depth, attention placement and head width."""
    from diffusers import UNet2DConditionModel

    widths = [unet_cfg.model_channels * m for m in unet_cfg.channel_multipliers]
    attention = [i in unet_cfg.transformer_levels for i in range(len(widths))]
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=widths,
        layers_per_block=unet_cfg.res_blocks_per_level,
        down_block_types=[("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in attention],
        up_block_types=[("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in attention[::-1]],
        cross_attention_dim=512,
        attention_head_dim=[w // unet_cfg.attention_head_dim for w in widths],
        norm_num_groups=unet_cfg.norm_groups,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in ("default", "demo"):
        vae_cfg, unet_cfg, image_size = configs(None if name == "default" else name)
        params, images_per_s = vae_rate(vae_cfg, image_size, args.vae_batch, args.steps)
        print(
            f"VAE   {name:7s} {image_size}px batch {args.vae_batch:3d} {params:>11,d} params "
            f"{images_per_s:8.2f} images/s"
        )
        latent = image_size // 2 ** (len(vae_cfg["block_channels"]) - 1)
        config = UNetConfig.from_dict(unet_cfg)
        ours = UNet(config)
        print(
            f"U-Net {name:7s} {latent}x{latent} batch {args.unet_batch:3d} "
            f"{count_parameters(ours):>11,d} params "
            f"{unet_rate(ours, latent, args.unet_batch, args.steps, peer=False):8.2f} latents/s"
        )
        peer = diffusers_peer(config)
        print(
            f"  peer: diffusers UNet2DConditionModel, same layout, "
            f"{count_parameters(peer):>11,d} params "
            f"{unet_rate(peer, latent, args.unet_batch, args.steps, peer=True):8.2f} latents/s"
        )


if __name__ == "__main__":
    main()
