"""What every entry script does first: seed, find the run directory, record the config; and
which checkpoint ``ckpt_path`` names."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm.config.checks import check_run_config
from ldm.devices import DeviceSettings

log = logging.getLogger(__name__)

# ``ckpt_path=last``: resume the most recent run of the stage (see resolve_checkpoint).
LATEST_CHECKPOINT = "last"


class OutputDirectoryError(RuntimeError):
    """A run directory that cannot be written, or has no room for checkpoints."""


@dataclass(frozen=True)
class RunContext:
    """The resolved essentials of one run."""

    run_dir: Path
    device: DeviceSettings
    seed: int


def wandb_offline_requested(logger_cfg: dict[str, Any]) -> bool:
    """``logger.offline=true`` or WANDB_MODE=offline/dryrun both mean: record locally only."""
    return logger_cfg["offline"] or os.environ.get("WANDB_MODE") in ("offline", "dryrun")


def current_run_dir() -> Path:
    """Hydra's output directory for this run (each run gets its own)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise RuntimeError(
        "No Hydra run directory: pass run_dir= explicitly when not under @hydra.main"
    )


def start_run(cfg: DictConfig, run_dir: Path | None = None) -> RunContext:
    """Check the config, seed everything, resolve the device and save the fully resolved
    config in the run dir.

    Hydra keeps the *unresolved* config in ``.hydra/``; ``config.yaml`` beside it has every
    interpolation filled in, so a run can be understood (and repeated) from that file alone.
    """
    run_dir = Path(run_dir) if run_dir is not None else current_run_dir()
    device = check_run_config(cfg, run_dir)
    require_writable_dir(run_dir, "run directory")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device.apply_backend_flags()
    if rank_zero_only.rank == 0:  # every process of a many-device run starts here; one writes
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


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def require_writable_dir(directory: Path, what: str, *, needed_bytes: int = 0) -> None:
    """Fail before training, not at the first checkpoint hours later, when ``directory`` cannot
    be created and written (a probe file) or has less than ``needed_bytes`` free."""
    directory = Path(directory)
    probe = directory / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with probe.open("xb") as file:
            file.write(b"ok")
            file.flush()
            os.fsync(file.fileno())
        probe.unlink()
    except OSError as error:
        raise OutputDirectoryError(
            f"Cannot write to the {what} {directory}: {error.strerror or error}. Training writes "
            "its config, checkpoints and logs there: make it writable, or point paths.runs_dir "
            "(or the LDM_ROOT environment variable) at a writable directory."
        ) from error
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise OutputDirectoryError(
            f"Only {_size(free)} free in the {what} {directory}, but checkpointing needs about "
            f"{_size(needed_bytes)} (each checkpoint is written beside the one it replaces). "
            "Free some space, or point paths.runs_dir (or LDM_ROOT) at a larger disk."
        )


def resolve_checkpoint(ckpt_path: str | Path | None, stage_runs_dir: Path) -> Path | None:
    """The checkpoint ``ckpt_path`` names: a file, or ``last``.

    ``last`` is the most recently written ``<stage_runs_dir>/<run>/checkpoints/last.ckpt``. Not the
    ``latest`` link: that is pointed only after a run finishes, and the run to resume is
    usually one that did not (killed, preempted, or itself a resumed run, which writes its
    checkpoints in its own directory). A file's modification time says which run got furthest
    most recently, and checkpoints are replaced atomically, so a newer ``last.ckpt`` is a
    complete one.
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) != LATEST_CHECKPOINT:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path} is not a file. Pass a checkpoint file "
                f"({stage_runs_dir}/<run>/checkpoints/last.ckpt), or ckpt_path={LATEST_CHECKPOINT} "
                "to resume the most recent run of this stage."
            )
        return path
    candidates = {path.resolve() for path in Path(stage_runs_dir).glob("*/checkpoints/last.ckpt")}
    if not candidates:
        raise FileNotFoundError(
            f"ckpt_path={LATEST_CHECKPOINT} found no run to resume: there is no "
            f"{stage_runs_dir}/<run>/checkpoints/last.ckpt. Start a new run (without ckpt_path), "
            "or pass the checkpoint file itself (ckpt_path=<path>.ckpt)."
        )
    latest = max(candidates, key=lambda path: (path.stat().st_mtime_ns, str(path)))
    log.info("ckpt_path=%s: resuming %s", LATEST_CHECKPOINT, latest)
    return latest
