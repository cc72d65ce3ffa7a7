"""Stage 1: train the β-VAE, measure its latent scale, export it for stage 2.

python train_vae.py [overrides]              e.g. experiment=demo trainer=cuda data.subset=40000
python train_vae.py ckpt_path=last           resume the latest run (or ckpt_path=<file>.ckpt)
python train_vae.py train=false ckpt_path=…  measure and export an existing checkpoint
"""

import sys

import hydra
from omegaconf import DictConfig

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.config.command_line import refuse_null_config_groups
from ldm.training.vae_stage import run_vae_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="train_vae")
def main(cfg: DictConfig) -> None:
    result = run_vae_stage(cfg)
    if result.latent_stats:
        scale = result.latent_stats["scale_factor"]
        print(f"VAE export: {result.export_dir} (latent scale factor {scale:.4f})")


if __name__ == "__main__":
    refuse_null_config_groups(sys.argv[1:])
    main()
