"""Build, or confirm current, the stage-2 caches ``python train_unet.py`` would train on, without
training: the same config, overrides and code path, so the training run then finds them ready.

python -m ldm.caches [overrides]     e.g. experiment=demo trainer=cuda data.subset=40000

Like a training run, it records its config and log in a run folder under ``runs/unet/``.
"""

import sys

import hydra
from omegaconf import DictConfig

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.config import CONF_DIR
from ldm.config.command_line import refuse_null_config_groups
from ldm.runs import start_run
from ldm.training.unet_stage import load_fitting_vae, open_caches


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train_unet")
def main(cfg: DictConfig) -> None:
    run = start_run(cfg)
    load_fitting_vae(cfg)
    caches = open_caches(cfg, run)
    print(f"Stage-2 caches, current, under {caches.folder}:")
    for split, latents in caches.latents.items():
        print(f"  {split} latents: {latents.folder}")
    print(f"  captions: {caches.captions.folder}")


if __name__ == "__main__":
    refuse_null_config_groups(sys.argv[1:])
    main()
