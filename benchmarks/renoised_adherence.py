"""Where along the sampling chain does a model lose what a picture shows? Synthetic-set images
are noised to the level an img2img strength starts from and denoised with their own prompt; the
analyser then reads background, colour, shape and size back from the result, per drawn shape.

    .venv/bin/python benchmarks/renoised_adherence.py [--device auto] [ckpt=runs/unet/latest]
        [strengths=0.1,0.3,0.5,1] [images_per_shape=16] [data=synthetic_b]

Any other ``key=value`` is a ``conf/sample.yaml`` override (e.g. ``cfg_scale=5 steps=50``).
Strength 1 is sampling from scratch (the init image is fully noised). A shape lost already at
strength 0.1, where only the last low-noise steps run, is detail the denoiser cannot keep, not
a prompt it did not follow; the measurement is ``ldm.evaluation.adherence.renoised_adherence``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from prompt_following import CONF_DIR
from report import DEVICE_CHOICES, BenchmarkError, accuracy_row, pick_device

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.diffusion import ScheduleConfig
from ldm.evaluation import adherence
from ldm.evaluation.errors import EvaluationError
from ldm.evaluation.generation import load_sampling_model
from ldm.pipeline import SamplingOptions
from ldm.sampling import SamplingError
from ldm.sampling.run import sampling_device

OWN_OPTIONS = {"strengths": "0.1,0.3,0.5,1", "images_per_shape": "16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="auto: CUDA, else MPS, else CPU"
    )
    parser.add_argument(
        "overrides", nargs="*", help="strengths=, images_per_shape= or conf/sample.yaml key=value"
    )
    args = parser.parse_args()
    try:
        device = pick_device(args.device)
        options = OWN_OPTIONS | {
            key: value
            for key, value in (arg.split("=", 1) for arg in args.overrides)
            if key in OWN_OPTIONS
        }
        strengths = [float(value) for value in options["strengths"].split(",")]
        images_per_shape = int(options["images_per_shape"])
    except (BenchmarkError, ValueError) as error:
        parser.error(str(error))
    if not all(0 < strength <= 1 for strength in strengths) or images_per_shape < 1:
        parser.error("strengths must lie in (0, 1] and images_per_shape be at least 1")
    overrides = [arg for arg in args.overrides if arg.split("=", 1)[0] not in OWN_OPTIONS]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", ["experiment=demo", f"trainer={device.type}", *overrides])
    model = load_sampling_model(cfg.ckpt, cfg.weights, cfg.vae_export, sampling_device(cfg.trainer))
    diffusion = ScheduleConfig(**model.checkpoint.diffusion)
    root, size = Path(cfg.data.root), model.checkpoint.image_size
    adherence.require_reliable_analyser(adherence.check_analyser(root, size))

    try:  # one check of the sampling options per strength, before any work
        sampling = {
            strength: SamplingOptions.checked(
                diffusion=diffusion,
                sampler=cfg.sampler,
                steps=cfg.steps,
                cfg_scale=cfg.cfg_scale,
                guidance_interval=cfg.guidance_interval,
                eta=cfg.eta,
                strength=None if strength == 1 else strength,
                image_to_image=strength < 1,
            )
            for strength in strengths
        }
    except ValueError as error:
        parser.error(str(error))

    def denoise(prompts: list[str], images: torch.Tensor, strength: float) -> torch.Tensor:
        from_scratch = strength == 1
        seeds = range(cfg.seed, cfg.seed + len(prompts))
        return torch.cat(
            [
                model.pipeline.generate(
                    prompts[start : start + cfg.batch_size],
                    seeds[start : start + cfg.batch_size],
                    sampling[strength],
                    init_images=None if from_scratch else images[start : start + cfg.batch_size],
                ).cpu()
                for start in range(0, len(prompts), cfg.batch_size)
            ]
        )

    scores = adherence.renoised_adherence(denoise, root, size, strengths, images_per_shape)
    print(
        f"{cfg.ckpt} | {root} | {cfg.sampler or 'default sampler'}, {cfg.steps} steps, "
        f"cfg_scale {cfg.cfg_scale}, {images_per_shape} images per drawn shape"
    )
    vae = model.pipeline.vae.eval()
    ceiling = adherence.vae_ceiling(vae, root, size, 3 * images_per_shape)
    print(accuracy_row("VAE ceiling", ceiling.accuracy, ceiling.num_images))
    for strength, groups in scores.items():
        print(f"strength {strength:g}")
        for name, result in groups.items():
            print(accuracy_row(f"  {name}", result.accuracy, result.num_images))


if __name__ == "__main__":
    try:
        main()
    except (SamplingError, EvaluationError) as error:  # already say what is wrong and the fix
        sys.exit(f"error: {error}")
