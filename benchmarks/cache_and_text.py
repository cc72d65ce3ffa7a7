"""What building the stage-2 caches costs on this machine, and what the text encoder costs per step.

    .venv/bin/python benchmarks/cache_and_text.py [--num-images 256] [--image-size 128]

Measures, on a freshly generated synthetic set (JPEG decoding included, one process):
image-latent cache build rate for the default and the demo VAE (random init, with and without
mirrored encodings), cache bytes per 1k images, and the random-init ViT-B-32 text tower's time
per batch of 32 prompts at 77 token positions and at the cached lengths.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ldm.data.coco_index import build_caption_index
from ldm.data.latent_cache import build_image_latent_cache
from ldm.data.latent_text_cache import build_caption_hidden_state_cache
from ldm.data.synthetic import SyntheticConfig, generate_synthetic_dataset
from ldm.models.vae import VAE, VAEConfig
from ldm.text import FrozenTextEncoder, TextEncoderConfig

DEMO_VAE = VAEConfig(block_channels=(32, 64, 64, 64), layers_per_block=1, norm_groups=16)
COCO_CAPTIONS_PER_IMAGE = 5


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.suffix == ".npy")


def latent_cache_rate(
    name: str, config: VAEConfig, records: list, image_size: int, work: Path, hflip: bool
) -> None:
    torch.manual_seed(0)
    vae = VAE(config).eval()
    folder = work / f"{name}-{'flip' if hflip else 'plain'}"
    started = time.perf_counter()
    build_image_latent_cache(
        folder,
        records,
        vae,
        key={},
        scale_factor=1.0,
        image_size_px=image_size,
        hflip=hflip,
        batch_size=32,
    )
    seconds = time.perf_counter() - started
    per_1k = folder_bytes(folder) / len(records) * 1000 / 2**20
    print(
        f"  {name:<8} hflip={hflip!s:<5} {len(records) / seconds:7.1f} images/s  "
        f"({len(records)} images in {seconds:.1f} s), {per_1k:.1f} MiB per 1k images"
    )


def text_batch_ms(encoder: FrozenTextEncoder, positions: int, repeats: int) -> float:
    prompts = [f"a photo of {i} small red circles on a wooden table" for i in range(32)]
    encoder.encode_hidden_states(prompts, positions)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encoder.encode_hidden_states(prompts, positions)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        root = generate_synthetic_dataset(
            work / "synthetic",
            SyntheticConfig(num_train=args.num_images, num_val=8, num_heldout=8, seed=0),
        )
        records, _ = build_caption_index(
            root / "annotations" / "captions_train2017.json", root / "train2017"
        )
        print(f"Image-latent cache build ({args.image_size} px, batch 32, random-init VAE):")
        for name, config in (("default", VAEConfig()), ("demo", DEMO_VAE)):
            for hflip in (False, True):
                latent_cache_rate(name, config, records, args.image_size, work, hflip)

        encoder = FrozenTextEncoder(TextEncoderConfig(pretrained=None))
        print("Text encoder, random-init ViT-B-32, batch of 32 prompts (median):")
        for positions in (77, 32, 17):
            ms = text_batch_ms(encoder, positions, args.repeats)
            print(f"  {positions:>2} token positions: {ms:7.1f} ms")

        started = time.perf_counter()
        cache = build_caption_hidden_state_cache(
            work / "captions",
            {"train": records},
            encoder,
            key={},
            max_positions=32,
            batch_size=64,
        )
        seconds = time.perf_counter() - started
        distinct = cache.metadata["count_distinct_captions"]
        per_1k = folder_bytes(cache.folder) / len(records) * 1000 / 2**20
        coco_per_1k = COCO_CAPTIONS_PER_IMAGE * 1000 * 32 * encoder.width * 2 / 2**20
        print(
            f"Caption cache on synthetic captions: {distinct} distinct of "
            f"{len(records) * COCO_CAPTIONS_PER_IMAGE}, {cache.num_positions} positions, "
            f"{distinct / seconds:.1f} captions/s, {per_1k:.1f} MiB per 1k images"
        )
        print(
            f"Caption cache projected for COCO (5 captions/image, 32 positions, width "
            f"{encoder.width}, float16): {coco_per_1k:.0f} MiB per 1k images"
        )


if __name__ == "__main__":
    main()
