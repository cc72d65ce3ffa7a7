"""Stage 2: train the text-conditional U-Net on latents cached by the frozen VAE.

python train_unet.py [overrides]        e.g. experiment=demo trainer=cuda data.subset=40000
python train_unet.py vae_export=runs/vae/<run>/export   (default: the latest VAE run)
python train_unet.py ckpt_path=last     resume the latest run (or ckpt_path=<file>.ckpt)
python -m ldm.caches [overrides]        only build the caches such a run trains on
"""

import sys

import hydra
from omegaconf import DictConfig

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.config.command_line import refuse_null_config_groups
from ldm.training.unet_stage import run_unet_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="train_unet")
def main(cfg: DictConfig) -> None:
    result = run_unet_stage(cfg)
    if result.export_dir is not None:
        print(f"U-Net export: {result.export_dir}")


if __name__ == "__main__":
    refuse_null_config_groups(sys.argv[1:])
    main()
