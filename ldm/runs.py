"""What every entry script does first: seed, find the run directory, record the config."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from ldm.devices import DeviceSettings, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """The resolved essentials of one run."""

    run_dir: Path
    device: DeviceSettings
    seed: int


def wandb_offline_requested(logger_cfg: dict[str, Any]) -> bool:
    """``logger.offline=true`` or WANDB_MODE=offline/dryrun both mean: record locally only."""
    return bool(logger_cfg.get("offline")) or os.environ.get("WANDB_MODE") in ("offline", "dryrun")


def current_run_dir() -> Path:
    """Hydra's output directory for this run (each run gets its own)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise RuntimeError(
        "No Hydra run directory: pass run_dir= explicitly when not under @hydra.main"
    )


def start_run(cfg: DictConfig, run_dir: Path | None = None) -> RunContext:
    """Seed everything, resolve the device and save the fully resolved config in the run dir.

    Hydra keeps the *unresolved* config in ``.hydra/``; ``config.yaml`` beside it has every
    interpolation filled in, so a run can be understood (and repeated) from that file alone.
    """
    run_dir = Path(run_dir) if run_dir is not None else current_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device = resolve_device(OmegaConf.to_container(cfg.trainer, resolve=True))
    device.apply_backend_flags()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info(
        "Run directory: %s | device: %s | precision: %s | compile: %s | seed: %d",
        run_dir,
        device.device,
        device.precision,
        device.compile_mode,
        cfg.seed,
    )
    return RunContext(run_dir=run_dir, device=device, seed=int(cfg.seed))


def point_latest_at(run_dir: Path) -> Path:
    """Make ``<stage runs>/latest`` a symlink to ``run_dir``: later stages default to it."""
    latest = run_dir.parent / "latest"
    temporary = run_dir.parent / f".latest.{run_dir.name}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run_dir.name, target_is_directory=True)
    temporary.replace(latest)
    return latest
