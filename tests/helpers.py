"""Helpers the tests import: composing the real configs, the paths of shared fixtures."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ldm.data.synthetic import SyntheticConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
COCO_SAMPLE = REPO_ROOT.parent / "shared" / "fixtures" / "coco-sample"
SMALL_SYNTHETIC = SyntheticConfig(num_train=48, num_val=16, num_heldout=12, seed=3)


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a real entry-script config the way ``@hydra.main`` would (struct mode on)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])
