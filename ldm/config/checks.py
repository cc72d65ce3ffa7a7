"""The composed config, checked once where it enters a stage, before anything is built or written.

Hydra checks every key and type the YAML files and plain overrides give against
``ldm/config/schemas.py`` while it composes; what it lets through is checked here: keys added
with ``+``, the values each section's parser refuses, output folders a file stands in, the
device. Each problem is refused with one message (what is wrong, the value seen, what to do), so
a bad override costs seconds rather than an hour of latent caching; past this point the training
code trusts the config and checks nothing on its hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ldm.config import plain
from ldm.config.keys import UnknownConfigKeyError, refuse_unknown_keys
from ldm.config.schemas import SCHEMAS_BY_STAGE
from ldm.data.array_store import CacheConfig
from ldm.data.config import DataConfig
from ldm.devices import DeviceSettings, check_processes, resolve_device
from ldm.diffusion.config import ScheduleConfig
from ldm.models.denoiser import denoiser_config
from ldm.models.vae import VAEConfig
from ldm.text.config import TextEncoderConfig

# Sections with a strict parser, checked up front so that their errors come before any work
# (the U-Net's, for one, would otherwise surface only after the latent caches are built).
_SECTION_PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "data": DataConfig.from_dict,
    "cache": CacheConfig.from_dict,
    "text_encoder": TextEncoderConfig.from_dict,
    "diffusion": ScheduleConfig.from_dict,
}
# Each takes the plain ``model`` section; stage 2 trains the denoiser ``model.denoiser`` names.
_STAGE_MODEL_PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "vae": lambda model: VAEConfig.from_dict(model["vae"]),
    "unet": lambda model: denoiser_config(model["denoiser"], model.get(model["denoiser"], {})),
}
# Precisions that store the weights themselves in 16 bits, the EMA copy's included.
_HALF_WEIGHT_PRECISIONS = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


def check_run_config(cfg: DictConfig, run_dir: Path) -> DeviceSettings:
    """Refuse a training config that cannot run, before any data, model or file is touched;
    returns the device it resolved (an absent one is refused too)."""
    refuse_keys_outside_the_schema(cfg)
    for section, parse in _SECTION_PARSERS.items():
        if section in cfg:
            parse(plain(cfg[section]))
    _STAGE_MODEL_PARSERS[cfg.stage](plain(cfg.model))
    outputs = {"hydra.run.dir": run_dir, "paths.runs_dir": Path(cfg.paths.runs_dir)}
    outputs["paths.cache_dir"] = Path(cfg.paths.cache_dir)
    if "cache" in cfg:
        outputs["cache.dir"] = Path(cfg.cache.dir)
    for name, path in outputs.items():
        refuse_file_in_the_way(name, path)
    trainer = plain(cfg.trainer)
    device = resolve_device(trainer)
    check_processes(trainer, device.device)
    if "ema" in cfg:
        refuse_half_precision_ema(device.precision, cfg.ema.decay_max)
    return device


def refuse_keys_outside_the_schema(cfg: DictConfig) -> None:
    """Refuse keys the schema of ``cfg``'s entry script does not have.

    Hydra refuses a mistyped key by itself, but accepts one added with ``+`` (its own error
    message even suggests it); nothing would read it, and the run would silently keep the value
    it was meant to change.
    """
    values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra", None)  # Hydra's own settings, checked by Hydra
    refuse_unknown_keys(values, SCHEMAS_BY_STAGE[cfg.stage], "")


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


class ConfigCheck(Callback):
    """Checks that need no data, run before Hydra creates the run folder: keys added with ``+``
    that the entry script's schema lacks, and a file standing where the run folder must go
    (which would end in a traceback from inside Hydra). Either ends the run with one message."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse(config, "hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse(config, "hydra.sweep.dir", config.hydra.sweep.dir)

    @staticmethod
    def _refuse(config: DictConfig, name: str, path: str) -> None:
        try:
            refuse_keys_outside_the_schema(config)
        except UnknownConfigKeyError as error:
            raise SystemExit(f"Error: {error}") from None
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
