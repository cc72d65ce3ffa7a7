"""Make images with a trained U-Net: text-to-image, or image-to-image from an init image.

python sample.py prompt="a red sports car" [n=4 sampler=ddim steps=50 cfg_scale=7.5 seed=0]
python sample.py experiment=demo prompt="a small red circle on a blue background"
python sample.py ckpt=runs/unet/<run>/checkpoints/best.ckpt weights=raw prompts_file=prompts.txt
python sample.py init_image=photo.jpg strength=0.6 prompt="a giraffe next to a tree"
python sample.py prompt="a cat" n=64 batch_size=64 compile=reduce-overhead  # CUDA graphs

Writes one PNG per image (its text chunks record prompt, seed, settings and the U-Net's
fingerprint) and a labelled grid per prompt into out_dir (default runs/samples/<date_time>).
"""

import sys

import hydra
from omegaconf import DictConfig

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.config.command_line import refuse_null_config_groups
from ldm.sampling import SamplingError, run_sampling


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        result = run_sampling(cfg)
    except SamplingError as error:  # input the user can fix: a message, not a traceback
        raise SystemExit(f"sample.py: {error}") from None
    images, grids = len(result.image_paths), len(result.grid_paths)
    print(f"Wrote {images} image(s) and {grids} labelled grid(s) to {result.out_dir}")


if __name__ == "__main__":
    refuse_null_config_groups(sys.argv[1:])
    main()
