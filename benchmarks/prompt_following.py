"""Do samples follow their prompts? Reads background, shape colour, shape and size back from the
pixels of images generated for synthetic-set prompts, for training and held-out combinations.

    .venv/bin/python benchmarks/prompt_following.py [--device auto] [ckpt=runs/unet/latest] [n=2]
        [prompts=12] [data=synthetic_b]

Any other ``key=value`` is a ``conf/sample.yaml`` override (e.g. ``cfg_scale=5 steps=50``).
The measurement is ``ldm.evaluation.adherence`` (also ``evaluate.py metrics=[adherence]``): the
analyser is first checked on the generator's own images, then judges each sample against its
prompt; chance levels and the VAE ceiling (what survives a VAE round trip) stand beside it.

``data=synthetic_b`` judges a model trained on variant b of the synthetic set (pass the data
option the model was trained with): the prompts, held-out combinations and the analyser's
palette all come from that set's ``synthetic.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from PIL import Image
from report import DEVICE_CHOICES, BenchmarkError, accuracy_row, pick_device

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.evaluation import adherence
from ldm.evaluation.errors import EvaluationError
from ldm.sampling import (
    SamplingError,
    load_matching_vae,
    load_sampling_checkpoint,
    read_png_metadata,
    run_sampling,
)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


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
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "sample",
            ["experiment=demo", "n=2", "progress=false", f"trainer={device.type}", *overrides],
        )
    checkpoint = load_sampling_checkpoint(cfg.ckpt, cfg.weights)
    root, size = Path(cfg.data.root), checkpoint.image_size
    check = adherence.check_analyser(root, size)
    adherence.require_reliable_analyser(check)

    def samples(split: str, prompts: list[str]):
        with tempfile.TemporaryDirectory() as out_dir:
            cfg.prompt, cfg.out_dir = prompts, out_dir
            for path in run_sampling(cfg).image_paths:
                yield read_png_metadata(path)["prompt"], Image.open(path).convert("RGB")

    variant = adherence.dataset_config(root).variant
    print(
        f"{cfg.ckpt} | synthetic variant {variant} ({root}) | {cfg.sampler}, {cfg.steps} steps, "
        f"cfg_scale {cfg.cfg_scale}, n={cfg.n}"
    )
    print(accuracy_row("analyser", check.accuracy, check.num_images))
    scores = adherence.measure_adherence(
        adherence.prompt_sets(root, int(options.get("prompts", 12))), samples
    )
    for split, result in scores.items():
        print(accuracy_row(split, result.accuracy, result.num_images))
    ceiling = adherence.vae_ceiling(load_matching_vae(checkpoint).eval(), root, size, 100)
    print(accuracy_row("VAE ceiling", ceiling.accuracy, ceiling.num_images))
    print(accuracy_row("chance", adherence.CHANCE_LEVELS))


if __name__ == "__main__":
    try:
        main()
    except (SamplingError, EvaluationError) as error:  # already say what is wrong and the fix
        sys.exit(f"error: {error}")
