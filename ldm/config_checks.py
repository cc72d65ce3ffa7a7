"""The composed config, checked once where it enters a stage, before anything is built or written.

Each problem is refused with one message (what is wrong, the value seen, what to do), so a bad
override costs seconds rather than an hour of latent caching; past this point the training code
trusts the config and checks nothing on its hot path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ldm.config_keys import UnknownConfigKeyError, unknown_key_line, unknown_keys_message
from ldm.data.array_store import CacheConfig
from ldm.data.config import DataConfig
from ldm.devices import DeviceSettings, resolve_device
from ldm.diffusion.config import ScheduleConfig
from ldm.models.unet import UNetConfig
from ldm.models.vae import VAEConfig
from ldm.text.config import TextEncoderConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
_GLOBAL_PACKAGE = re.compile(r"^(?:#.*\n)*#\s*@package\s+_global_\b", re.MULTILINE)

# Sections with a strict parser, checked up front so that their errors come before any work
# (the U-Net's, for one, would otherwise surface only after the latent caches are built).
_SECTION_PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "data": DataConfig.from_dict,
    "cache": CacheConfig.from_dict,
    "text_encoder": TextEncoderConfig.from_dict,
    "diffusion": ScheduleConfig.from_dict,
}
_STAGE_MODEL_PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "vae": VAEConfig.from_dict,
    "unet": UNetConfig.from_dict,
}
# Precisions that store the weights themselves in 16 bits, the EMA copy's included.
_HALF_WEIGHT_PRECISIONS = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


def check_run_config(cfg: DictConfig, run_dir: Path) -> DeviceSettings:
    """Refuse a training config that cannot run, before any data, model or file is touched;
    returns the device it resolved (an absent one is refused too)."""
    refuse_unknown_keys_in(cfg, f"train_{cfg.stage}")
    for section, parse in _SECTION_PARSERS.items():
        if section in cfg:
            parse(_plain(cfg[section]))
    _STAGE_MODEL_PARSERS[cfg.stage](_plain(cfg.model[cfg.stage]))
    outputs = {"hydra.run.dir": run_dir, "paths.runs_dir": Path(cfg.paths.runs_dir)}
    outputs["paths.cache_dir"] = Path(cfg.paths.cache_dir)
    if "cache" in cfg:
        outputs["cache.dir"] = Path(cfg.cache.dir)
    for name, path in outputs.items():
        refuse_file_in_the_way(name, path)
    device = resolve_device(_plain(cfg.trainer))
    if "ema" in cfg:
        refuse_half_precision_ema(device.precision, cfg.ema.decay_max)
    return device


def refuse_unknown_keys_in(cfg: DictConfig, config_name: str, conf_dir: Path = CONF_DIR) -> None:
    """Refuse keys that neither ``config_name`` nor any option of a config group defines.

    Hydra refuses a mistyped override by itself, but accepts one added with ``+``; nothing
    would read it, and the run would silently use the default it was meant to change.
    """
    known = known_keys(config_name, conf_dir)
    lines = _unknown_key_lines(OmegaConf.to_container(cfg, resolve=False), known, "")
    if lines:
        raise UnknownConfigKeyError(unknown_keys_message(lines))


def known_keys(config_name: str, conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """The key tree (leaves None) that ``conf_dir/config_name.yaml`` and every group option
    in ``conf_dir`` can define together; a group option's keys sit under its group's name
    unless it is ``# @package _global_``."""
    tree: dict[str, Any] = {}
    _merge_keys(tree, _yaml_keys(conf_dir / f"{config_name}.yaml"))
    for option in sorted(conf_dir.rglob("*.yaml")):
        if option.parent == conf_dir:
            continue  # another entry script's config
        keys = _yaml_keys(option)
        if not _GLOBAL_PACKAGE.match(option.read_text(encoding="utf-8")):
            for group in reversed(option.parent.relative_to(conf_dir).parts):
                keys = {group: keys}
        _merge_keys(tree, keys)
    tree.pop("hydra", None)  # Hydra's own settings: not part of the job's config
    return tree


def refuse_file_in_the_way(name: str, path: Path) -> None:
    """Refuse an output directory that cannot be created because a file stands at it or at
    one of its parents."""
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            where = "is" if candidate == path else f"lies under {candidate}, which is"
            raise NotADirectoryError(
                f"{name}={path} {where} a file, so nothing can be written into it. Point "
                f"{name} at a directory (or move the file away)."
            )


class OutputDirCheck(Callback):
    """Hydra creates the run folder before any of our code runs: a file standing where it must
    go would end in a traceback from inside Hydra, so this callback refuses it first."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse_file_at("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse_file_at("hydra.sweep.dir", config.hydra.sweep.dir)

    @staticmethod
    def _refuse_file_at(name: str, path: str) -> None:
        try:
            refuse_file_in_the_way(name, Path(path))
        except NotADirectoryError as error:
            hint = "it is built from paths.runs_dir (out_dir in sample.py and evaluate.py)"
            raise SystemExit(f"Error: {error} ({name}: {hint})") from None


def refuse_half_precision_ema(precision: str, ema_decay_max: float) -> None:
    """Refuse a precision that would store the EMA weights in 16 bits: an EMA update is a
    small fraction of the weight's distance to the trained one and rounds away entirely."""
    dtype = _HALF_WEIGHT_PRECISIONS.get(precision)
    if dtype is None:
        return
    name = str(dtype).removeprefix("torch.")
    raise ValueError(
        f"trainer.precision={precision} stores every weight in {name}, the EMA copy's included. "
        f"Each EMA update moves a weight by (1 - ema.decay_max) = {1 - ema_decay_max:.0e} of its "
        f"distance to the trained weight, far below {name}'s resolution "
        f"({torch.finfo(dtype).eps:.0e} of the weight's value): the average would never move. "
        f"Use trainer.precision={precision.replace('-true', '-mixed')} (16-bit compute, float32 "
        "weights)."
    )


def _unknown_key_lines(values: dict[str, Any], known: dict[str, Any], section: str) -> list[str]:
    lines = []
    for name, value in values.items():
        if name not in known:
            lines.append(unknown_key_line(section, name, value, known))
        elif isinstance(value, dict) and isinstance(known[name], dict):
            path = f"{section}.{name}" if section else name
            lines.extend(_unknown_key_lines(value, known[name], path))
    return lines


def _yaml_keys(path: Path) -> dict[str, Any]:
    keys = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    keys.pop("defaults", None)
    return keys


def _merge_keys(tree: dict[str, Any], keys: dict[str, Any]) -> None:
    for name, value in keys.items():
        if isinstance(value, dict):
            if not isinstance(tree.get(name), dict):
                tree[name] = {}
            _merge_keys(tree[name], value)
        else:
            tree.setdefault(name, None)


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
