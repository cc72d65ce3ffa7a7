"""What building the stage-2 caches costs on this machine, and what the text encoder costs per step.

    .venv/bin/python benchmarks/cache_and_text.py [--num-images 256] [--image-size 128]
        [--device auto] [--precision bf16-mixed]

Measures, on a freshly generated synthetic set (JPEG decoding included, one process):
image-latent cache build rate for the default and the demo VAE (random init, with and without
mirrored encodings; the VAE on the device under the run's autocast), cache bytes per 1k images,
and the random-init ViT-B-32 text tower's time per batch of 32 prompts at 77 token positions and
at the cached lengths (always fp32: the encoder turns autocast off, as in training).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from report import (
    BenchDevice,
    add_device_arguments,
    markdown_table,
    resolve_device,
    time_calls,
    write_json,
)

from ldm.caches.caption_states import build_caption_hidden_state_cache
from ldm.caches.image_latents import build_image_latent_cache
from ldm.data.coco_index import build_caption_index
from ldm.data.synthetic import SyntheticConfig, generate_synthetic_dataset
from ldm.models.vae import VAE, VAEConfig
from ldm.text import FrozenTextEncoder, TextEncoderConfig

DEMO_VAE = VAEConfig(block_channels=(32, 64, 64, 64), layers_per_block=1, norm_groups=16)
COCO_CAPTIONS_PER_IMAGE = 5
CACHE_BATCH = 32


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.suffix == ".npy")


def latent_cache_rate(
    name: str,
    config: VAEConfig,
    records: list,
    image_size: int,
    work: Path,
    hflip: bool,
    device: BenchDevice,
) -> dict[str, Any]:
    torch.manual_seed(0)
    vae = VAE(config).eval().to(device.torch_device)
    folder = work / f"{name}-{'flip' if hflip else 'plain'}"
    if device.type != "cpu":
        # A GPU picks (cuDNN autotunes) its kernels on the first batch of each shape: do that
        # outside the timed build, on a batch shaped like the build's (mirrors are batched in).
        count = (2 if hflip else 1) * CACHE_BATCH
        warm_up = torch.zeros(count, 3, image_size, image_size, device=device.torch_device)
        with torch.no_grad(), device.autocast():
            vae.encode(warm_up)
    device.synchronize()
    started = time.perf_counter()
    with device.autocast():
        build_image_latent_cache(
            folder,
            records,
            vae,
            key={},
            image_size_px=image_size,
            hflip=hflip,
            batch_size=CACHE_BATCH,
            device=device.torch_device,
        )
    device.synchronize()
    seconds = time.perf_counter() - started
    row = {
        "vae": name,
        "hflip": hflip,
        "images_per_second": len(records) / seconds,
        "mib_per_1k_images": folder_bytes(folder) / len(records) * 1000 / 2**20,
    }
    print(
        f"  {name:<8} hflip={hflip!s:<5} {row['images_per_second']:7.1f} images/s  "
        f"({len(records)} images in {seconds:.1f} s), {row['mib_per_1k_images']:.1f} MiB "
        "per 1k images"
    )
    return row


def text_batch_ms(
    encoder: FrozenTextEncoder, positions: int, repeats: int, device: BenchDevice
) -> float:
    """Mean over ``repeats`` batches after one warm-up batch."""
    prompts = [f"a photo of {i} small red circles on a wooden table" for i in range(32)]
    timing = time_calls(
        lambda: encoder.encode_hidden_states(prompts, positions),
        device,
        iterations=repeats,
        warmup=1,
    )
    return timing.seconds_per_call * 1000


def markdown_section(result: dict[str, Any]) -> str:
    """RESULTS.md section: cache build rates and sizes, text-encoder batch times."""
    caches = markdown_table(
        ["VAE (random init)", "mirrored too", "images/s", "MiB per 1k images"],
        [
            [
                r["vae"],
                r["hflip"],
                f"{r['images_per_second']:,.1f}",
                f"{r['mib_per_1k_images']:.1f}",
            ]
            for r in result["latent_cache"]
        ],
    )
    text = markdown_table(
        ["token positions", "ms per batch of 32 prompts"],
        [[p, f"{ms:,.1f}"] for p, ms in result["text_ms_per_batch"].items()],
    )
    caption = result["caption_cache"]
    return "\n\n".join(
        [
            "## Stage-2 caches and text encoder",
            f"Image-latent cache build on {result['num_images']} synthetic images at "
            f"{result['image_size']} px, batch 32 (JPEG decoding included):",
            caches,
            "Random-init ViT-B-32 text tower (fp32):",
            text,
            f"Caption cache: {caption['captions_per_second']:,.1f} captions/s; projected for COCO "
            f"(5 captions/image, 32 positions, float16): {caption['coco_mib_per_1k_images']:.0f} "
            "MiB per 1k images.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    add_device_arguments(parser)
    parser.add_argument("--json", type=Path, help="also write the figures here (for run_all)")
    args = parser.parse_args()
    device = resolve_device(parser, args)
    print(f"torch {torch.__version__}, {device.describe()}")
    result: dict[str, Any] = {
        "device": device,
        "num_images": args.num_images,
        "image_size": args.image_size,
    }

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
        result["latent_cache"] = [
            latent_cache_rate(name, config, records, args.image_size, work, hflip, device)
            for name, config in (("default", VAEConfig()), ("demo", DEMO_VAE))
            for hflip in (False, True)
        ]

        encoder = FrozenTextEncoder(TextEncoderConfig(pretrained=None)).to(device.torch_device)
        print(f"Text encoder, random-init ViT-B-32, batch of 32 prompts (mean of {args.repeats}):")
        result["text_ms_per_batch"] = {}
        for positions in (77, 32, 17):
            ms = text_batch_ms(encoder, positions, args.repeats, device)
            result["text_ms_per_batch"][positions] = ms
            print(f"  {positions:>2} token positions: {ms:7.1f} ms")

        device.synchronize()
        started = time.perf_counter()
        cache = build_caption_hidden_state_cache(
            work / "captions",
            {"train": records},
            encoder,
            key={},
            max_positions=32,
            batch_size=64,
        )
        device.synchronize()
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
        result["caption_cache"] = {
            "captions_per_second": distinct / seconds,
            "mib_per_1k_images": per_1k,
            "coco_mib_per_1k_images": coco_per_1k,
        }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
