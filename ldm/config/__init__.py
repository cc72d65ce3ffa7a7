"""The run configuration: Hydra nodes turned into the plain values the layers below take."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def plain(node: Any) -> Any:
    """A config node (or an already plain mapping) as plain dicts and lists, interpolations
    resolved: what modules, hparams and JSON files take."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node
