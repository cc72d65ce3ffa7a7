"""The run configuration: Hydra nodes turned into the plain values the layers below take.

``conf/`` holds the values and their comments; ``ldm/config/schemas.py`` says which keys each
config has and their types, checked when Hydra composes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def plain(node: Any) -> Any:
    """A config node (or an already plain mapping) as plain dicts and lists, interpolations
    resolved: what modules, hparams and JSON files take."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node
