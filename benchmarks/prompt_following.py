"""Do samples follow their prompts? Reads background, shape colour, shape and size back from the
pixels of images generated for synthetic-set prompts, for training and held-out combinations.

    .venv/bin/python benchmarks/prompt_following.py [--device auto] [ckpt=runs/unet/latest] [n=2]
        [prompts=12]

Any other ``key=value`` is a ``conf/sample.yaml`` override (e.g. ``cfg_scale=5 steps=50``).
Prompts use the first caption template ("a small red circle on a blue background"); the
synthetic set's ``read_attributes`` decides what each image shows. Chance level: 1/7 for the
background, 1/8 for the colour, 1/3 for the shape, 1/2 for the size. The "VAE ceiling" row reads
the same attributes from VAE reconstructions of validation images (compared with the attributes
read from the images themselves): samples cannot show what the autoencoder loses.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from report import DEVICE_CHOICES, BenchmarkError, pick_device

from ldm.data.synthetic import SIZES, SyntheticConfig, read_attributes, split_combinations
from ldm.data.transforms import image_to_model_tensor
from ldm.sampling import (
    load_matching_vae,
    load_sampling_checkpoint,
    read_png_metadata,
    run_sampling,
)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ATTRIBUTES = ("background", "color", "shape", "size")


def prompts_for(combos: list[tuple[str, str, str]], count: int, seed: int) -> dict[str, dict]:
    """``count`` prompts (seeded choice of combination and size) and the attributes they ask for."""
    rng = np.random.default_rng(seed)
    chosen: dict[str, dict] = {}
    for position in rng.permutation(len(combos))[:count]:
        shape, color, background = combos[position]
        size = str(rng.choice(list(SIZES)))
        prompt = f"a {size} {color} {shape} on a {background} background"
        chosen[prompt] = {"shape": shape, "color": color, "background": background, "size": size}
    return chosen


def accuracy(asked: dict[str, dict], image_paths: list[Path]) -> dict[str, float]:
    hits = {name: 0 for name in ATTRIBUTES}
    for path in image_paths:
        wanted = asked[read_png_metadata(path)["prompt"]]
        seen = read_attributes(Image.open(path))
        for name in ATTRIBUTES:
            hits[name] += seen[name] == wanted[name]
    return {name: hits[name] / len(image_paths) for name in ATTRIBUTES}


def vae_ceiling(cfg, num_images: int) -> dict[str, float]:
    """Attribute agreement between validation images and their VAE reconstructions."""
    checkpoint = load_sampling_checkpoint(cfg.ckpt, cfg.weights)
    vae = load_matching_vae(checkpoint).eval()
    size = checkpoint.image_size
    files = sorted((Path(cfg.data.root) / "val2017").glob("*.jpg"))[:num_images]
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for file in files:
        image = image_to_model_tensor(Image.open(file).convert("RGB"), size)
        with torch.no_grad():
            reconstruction = vae.decode(vae.encode(image[None]).mode())[0]
        truth, seen = (read_attributes(_to_pixels(x)) for x in (image, reconstruction))
        for name in ATTRIBUTES:
            hits[name] += seen[name] == truth[name]
    return {name: hits[name] / len(files) for name in ATTRIBUTES}


def _to_pixels(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def _row(label: str, count: int, scores: dict[str, float]) -> str:
    shown = "  ".join(f"{name} {100 * value:5.1f}%" for name, value in scores.items())
    return f"{label:12s} {count:3d} images  {shown}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="auto: CUDA, else MPS, else CPU"
    )
    parser.add_argument("overrides", nargs="*", help="prompts=N or conf/sample.yaml key=value")
    args = parser.parse_args()
    try:
        device = pick_device(args.device)  # sampling then uses the device's profile precision
    except BenchmarkError as error:
        parser.error(str(error))
    options = dict(arg.split("=", 1) for arg in args.overrides if arg.startswith("prompts="))
    overrides = [arg for arg in args.overrides if not arg.startswith("prompts=")]
    num_prompts = int(options.get("prompts", 12))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "sample",
            ["experiment=demo", "n=2", "progress=false", f"trainer={device.type}", *overrides],
        )
    manifest = json.loads((Path(cfg.data.root) / "synthetic.json").read_text())
    train_combos, _ = split_combinations(SyntheticConfig(**manifest["config"]))
    heldout = [tuple(c) for c in manifest["heldout_combinations"]]
    print(f"{cfg.ckpt} | {cfg.sampler}, {cfg.steps} steps, cfg_scale {cfg.cfg_scale}, n={cfg.n}")
    for split, combos in (("train", train_combos), ("held-out", heldout)):
        asked = prompts_for(combos, num_prompts, seed=1 if split == "train" else 2)
        with tempfile.TemporaryDirectory() as out_dir:
            cfg.prompt, cfg.out_dir = list(asked), out_dir
            result = run_sampling(cfg)
            scores = accuracy(asked, result.image_paths)
        print(_row(split, len(result.image_paths), scores))
    print(_row("VAE ceiling", 100, vae_ceiling(cfg, 100)))


if __name__ == "__main__":
    main()
