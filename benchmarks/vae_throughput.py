"""Training throughput of the VAE (images/s) for the default and demo configs on this machine.

    .venv/bin/python benchmarks/vae_throughput.py [--batch-size 8] [--steps 5]

Times full optimisation steps (forward, MSE + β·KL, backward, AdamW step) on random images after
one warm-up step, the way `train_vae.py` runs them, and prints one line per config.
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldm.models.vae import VAE, VAEConfig, count_parameters, vae_loss

CONF_DIR = str((__import__("pathlib").Path(__file__).resolve().parents[1] / "conf"))


def model_and_size(experiment: str | None) -> tuple[VAEConfig, int]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train_vae", [f"experiment={experiment}"] if experiment else [])
    vae_cfg = OmegaConf.to_container(cfg.model.vae, resolve=True)
    return VAEConfig.from_dict(vae_cfg), int(cfg.data.image_size)


def images_per_second(config: VAEConfig, image_size: int, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    vae = VAE(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    images = torch.rand(batch_size, 3, image_size, image_size) * 2 - 1

    def step() -> None:
        reconstruction, posterior = vae(images)
        loss = vae_loss(reconstruction, images, posterior, kl_weight=1e-5)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator, kernels
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    for name in (None, "demo"):
        config, size = model_and_size(name)
        rate = images_per_second(config, size, args.batch_size, args.steps)
        label = name or "default"
        print(f"{label:8s} {size}px  {count_parameters(VAE(config)):>11,d} params  {rate:7.2f} img/s")


if __name__ == "__main__":
    main()
