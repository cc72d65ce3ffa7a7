"""Seconds per image of sample.py's pipeline for each sampler, at demo and default model sizes.

    .venv/bin/python benchmarks/sampling_speed.py [--batch-size 4] [--device auto] [--threads N]

Times ``LatentDiffusionPipeline.generate`` end to end — prompt encoding, the sampler loop with
classifier-free guidance (cfg_scale 7.5: two U-Net branches per step) and VAE decoding — after
one short warm-up, with random weights (speed does not depend on training). Model loading is not
included. The text encoder is a random-init ViT-B-32 (the real architecture, no download).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldm.devices import resolve_device
from ldm.diffusion import NoiseSchedule, ScheduleConfig
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, VAEConfig, count_parameters
from ldm.pipeline import LatentDiffusionPipeline, SamplingOptions
from ldm.sampling.run import autocast_dtype
from ldm.text import FrozenTextEncoder, TextEncoderConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
SAMPLER_STEPS = (("ddpm", 200), ("ddim", 50), ("dpmpp_2m", 20))
CFG_SCALE = 7.5
PROMPT = "a red sports car parked on a city street"


def build_pipeline(
    experiment: str | None, text_encoder: FrozenTextEncoder, device: str, precision: str
) -> tuple[LatentDiffusionPipeline, int, int]:
    """A pipeline of the train_unet config's model sizes; also its image size and U-Net size."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train_unet", [f"experiment={experiment}"] if experiment else [])
    vae_config = VAEConfig.from_dict(OmegaConf.to_container(cfg.model.vae, resolve=True))
    unet = UNet(UNetConfig.from_dict(OmegaConf.to_container(cfg.model.unet, resolve=True)))
    image_size = int(cfg.data.image_size)
    latent_side = image_size // 2 ** (len(vae_config.block_channels) - 1)
    pipeline = LatentDiffusionPipeline(
        unet=unet.eval(),
        vae=VAE(vae_config).eval(),
        text_encoder=text_encoder,
        schedule=NoiseSchedule(ScheduleConfig(**OmegaConf.to_container(cfg.diffusion))),
        latent_scale=1.0,
        latent_shape=(vae_config.latent_channels, latent_side, latent_side),
        context_length=int(cfg.cache.text_max_positions),
        device=device,
        autocast_dtype=autocast_dtype(precision),
    )
    return pipeline, image_size, count_parameters(unet)


def seconds_per_image(
    pipeline: LatentDiffusionPipeline, sampler: str, steps: int, batch_size: int
) -> float:
    prompts, seeds = [PROMPT] * batch_size, list(range(batch_size))
    warm_up = SamplingOptions(sampler=sampler, steps=2, cfg_scale=CFG_SCALE)
    pipeline.generate(prompts, seeds, warm_up)  # allocator, kernels
    options = SamplingOptions(sampler=sampler, steps=steps, cfg_scale=CFG_SCALE)
    synchronize = torch.cuda.synchronize if pipeline.device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    pipeline.generate(prompts, seeds, options)
    synchronize()
    return (time.perf_counter() - start) / batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        trainer = compose("train_unet", [f"trainer={args.device}"]).trainer
    device = resolve_device(OmegaConf.to_container(trainer, resolve=True))
    text_encoder = FrozenTextEncoder(TextEncoderConfig(pretrained=None))
    print(
        f"torch {torch.__version__}, device {device.device} ({device.precision}), "
        f"{torch.get_num_threads()} CPU threads, batch {args.batch_size}, cfg_scale {CFG_SCALE}"
    )
    for experiment in ("demo", None):
        pipeline, size, parameters = build_pipeline(
            experiment, text_encoder, device.device, device.precision
        )
        for sampler, steps in SAMPLER_STEPS:
            seconds = seconds_per_image(pipeline, sampler, steps, args.batch_size)
            print(
                f"{experiment or 'default':8s} {size}px  U-Net {parameters / 1e6:4.1f}M  "
                f"{sampler:9s} {steps:3d} steps  {seconds:7.3f} s/image"
            )


if __name__ == "__main__":
    main()
