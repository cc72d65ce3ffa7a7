"""Seconds per image of sample.py's pipeline for each sampler, at demo and default model sizes.

    .venv/bin/python benchmarks/sampling_speed.py [--batch-size 4] [--device auto]
        [--precision bf16-mixed] [--compile none] [--threads N]

Times ``LatentDiffusionPipeline.generate`` end to end — prompt encoding, the sampler loop with
classifier-free guidance (cfg_scale 7.5: two U-Net branches per step) and VAE decoding — after
one short warm-up (which also holds any compilation), with random weights (speed does not depend
on training), synchronised with the device at both ends. Model loading is not included. The text
encoder is a random-init ViT-B-32 (the real architecture, no download).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from report import (
    BenchDevice,
    add_device_arguments,
    markdown_table,
    resolve_device,
    write_json,
)

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.diffusion import NoiseSchedule, ScheduleConfig
from ldm.latent_norm import LatentNormalizer
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, VAEConfig, count_parameters
from ldm.pipeline import COMPILE_MODES, LatentDiffusionPipeline, SamplingOptions
from ldm.sampling.run import autocast_dtype
from ldm.text import FrozenTextEncoder, TextEncoderConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
CONFIG_NAMES = ("demo", "default")
SAMPLER_STEPS = (("ddpm", 200), ("ddim", 50), ("dpmpp_2m", 20))
CFG_SCALE = 7.5
PROMPT = "a red sports car parked on a city street"


def build_pipeline(
    experiment: str | None,
    text_encoder: FrozenTextEncoder,
    device: BenchDevice,
    compile_mode: str,
    batch_size: int,
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
        latent_normalizer=LatentNormalizer.global_scale(1.0),
        latent_shape=(vae_config.latent_channels, latent_side, latent_side),
        context_length=int(cfg.cache.text_max_positions),
        device=device.torch_device,
        autocast_dtype=autocast_dtype(device.precision),
        compile_mode=compile_mode,
        fixed_batch_size=None if compile_mode == "none" else batch_size,
    )
    return pipeline, image_size, count_parameters(unet)


def seconds_per_image(
    pipeline: LatentDiffusionPipeline,
    sampler: str,
    steps: int,
    batch_size: int,
    device: BenchDevice,
) -> float:
    prompts, seeds = [PROMPT] * batch_size, list(range(batch_size))
    # Three steps: allocator, kernels, compilation and CUDA-graph recording all happen here.
    warm_up = SamplingOptions(sampler=sampler, steps=3, cfg_scale=CFG_SCALE)
    pipeline.generate(prompts, seeds, warm_up)
    options = SamplingOptions(sampler=sampler, steps=steps, cfg_scale=CFG_SCALE)
    device.synchronize()
    start = time.perf_counter()
    pipeline.generate(prompts, seeds, options)
    device.synchronize()
    return (time.perf_counter() - start) / batch_size


def markdown_section(result: dict[str, Any]) -> str:
    """RESULTS.md section: seconds per image, one row per model size, one column per sampler."""
    by_config: dict[str, dict[str, Any]] = {}
    for row in result["rows"]:
        by_config.setdefault(row["config"], {"row": row})[row["sampler"]] = row["seconds_per_image"]
    header = ["config", "U-Net parameters"] + [f"{s} {n} steps" for s, n in SAMPLER_STEPS]
    lines = [
        [f"{name} ({v['row']['image_size']}px)", f"{v['row']['unet_parameters']:,}"]
        + [f"{v[sampler]:.3f}" for sampler, _ in SAMPLER_STEPS]
        for name, v in by_config.items()
    ]
    return "\n\n".join(
        [
            "## Sampling (seconds per image)",
            f"`LatentDiffusionPipeline.generate`, batch {result['batch_size']}, cfg_scale "
            f"{CFG_SCALE}, compile={result['compile']}: prompt encoding, the sampler loop and VAE "
            "decoding.",
            markdown_table(header, lines),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--configs", nargs="+", choices=CONFIG_NAMES, default=list(CONFIG_NAMES))
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none", help="the U-Net's")
    add_device_arguments(parser)
    parser.add_argument("--json", type=Path, help="also write the figures here (for run_all)")
    args = parser.parse_args()
    device = resolve_device(parser, args)
    text_encoder = FrozenTextEncoder(TextEncoderConfig(pretrained=None))
    print(
        f"torch {torch.__version__}, {device.describe()}, batch {args.batch_size}, "
        f"cfg_scale {CFG_SCALE}, compile={args.compile}"
    )
    rows = []
    for config in args.configs:
        experiment = None if config == "default" else config
        pipeline, size, parameters = build_pipeline(
            experiment, text_encoder, device, args.compile, args.batch_size
        )
        for sampler, steps in SAMPLER_STEPS:
            seconds = seconds_per_image(pipeline, sampler, steps, args.batch_size, device)
            print(
                f"{config:8s} {size}px  U-Net {parameters / 1e6:4.1f}M  "
                f"{sampler:9s} {steps:3d} steps  {seconds:7.3f} s/image",
                flush=True,
            )
            rows.append(
                {
                    "config": config,
                    "image_size": size,
                    "unet_parameters": parameters,
                    "sampler": sampler,
                    "steps": steps,
                    "seconds_per_image": seconds,
                }
            )
    write_json(
        args.json,
        {"device": device, "batch_size": args.batch_size, "compile": args.compile, "rows": rows},
    )


if __name__ == "__main__":
    main()
