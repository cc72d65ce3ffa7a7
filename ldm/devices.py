"""Choosing the accelerator and the precision/loader settings that suit it, from the config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ldm.data.datamodule import LoaderSettings
from ldm.pipeline import COMPILE_MODES

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
# auto: one device, or Lightning's DDP for several; ddp: DistributedDataParallel, one process per
# device. Spawn-based strategies are left out: stage 2 needs its processes started before the
# Trainer exists (ldm.training.trainer.launch_processes).
STRATEGY_CHOICES = ("auto", "ddp")


class DeviceUnavailableError(RuntimeError):
    """The config asked for a device this machine does not have."""


@dataclass(frozen=True)
class DeviceSettings:
    """Everything device-specific a run needs, resolved once."""

    device: str  # cuda | mps | cpu
    precision: str
    loader: LoaderSettings
    compile_mode: str = "none"
    fused_optimizer: bool = False
    tf32: bool = False
    cudnn_benchmark: bool = False
    channels_last: bool = False

    def apply_backend_flags(self) -> None:
        """Process-wide math settings of the profile: TF32 matmuls/convolutions (fp32 inputs
        on Ampere and newer) and cuDNN's autotuner (worth it with the fixed training shapes)."""
        if self.device != "cuda":
            return
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        torch.backends.cudnn.benchmark = self.cudnn_benchmark

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def detect_device() -> str:
    """CUDA, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if mps_available():
        return "mps"
    return "cpu"


def _check_available(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "trainer=cuda was requested but no CUDA GPU is visible to PyTorch "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). "
            "Use trainer=auto to pick the best available device, or trainer=cpu."
        )
    if device == "mps" and not mps_available():
        raise DeviceUnavailableError(
            "trainer=mps was requested but Apple MPS is not available on this machine "
            "(it needs macOS 12.3+ on Apple silicon). Use trainer=auto or trainer=cpu."
        )


def check_processes(trainer_cfg: dict[str, Any], device: str) -> None:
    """Refuse process and accumulation settings Lightning would reject later, or worse, accept."""
    strategy = trainer_cfg["strategy"]
    if strategy not in STRATEGY_CHOICES:
        raise ValueError(
            f"trainer.strategy must be one of {STRATEGY_CHOICES}, got {strategy!r}: use "
            "trainer=ddp for one process per device (Lightning's DistributedDataParallel)."
        )
    for key in ("num_nodes", "accumulate_grad_batches"):
        value = trainer_cfg[key]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"trainer.{key} must be a positive integer, got {value!r}")
    devices, num_nodes = trainer_cfg["devices"], trainer_cfg["num_nodes"]
    if devices != "auto" and (not isinstance(devices, int) or devices < 1):
        raise ValueError(
            f"trainer.devices must be a positive integer (devices per node) or auto (every "
            f"visible GPU), got {devices!r}"
        )
    if device == "mps" and (devices not in (1, "auto") or num_nodes > 1):
        raise ValueError(
            f"Apple MPS trains in one process on one device, but trainer.devices={devices} and "
            f"trainer.num_nodes={num_nodes}: set both to 1, or train on CUDA GPUs (or "
            "trainer=cpu) for several processes."
        )


def resolve_device(trainer_cfg: dict[str, Any]) -> DeviceSettings:
    """Turn ``trainer.device`` and its profile into concrete settings.

    Per-device settings live in ``trainer.profiles`` (YAML), so every choice is visible in the
    run's saved config; ``trainer.precision``, ``trainer.num_workers`` and ``trainer.compile``
    override the profile's unless null. Only these keys are read (sampling passes no others);
    the process layout is :func:`check_processes`'s.
    """
    requested = trainer_cfg["device"]
    if requested not in DEVICE_CHOICES:
        raise ValueError(f"trainer.device must be one of {DEVICE_CHOICES}, got {requested!r}")
    device = detect_device() if requested == "auto" else requested
    _check_available(device)
    profile = trainer_cfg["profiles"][device]
    precision = trainer_cfg["precision"] or profile["precision"]
    if device == "cuda" and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        log.warning("This GPU has no bfloat16 support: using 16-mixed precision instead")
        precision = "16-mixed"
    workers = trainer_cfg["num_workers"]
    loader = LoaderSettings(
        num_workers=profile["num_workers"] if workers is None else workers,
        pin_memory=profile["pin_memory"],
        persistent_workers=profile["persistent_workers"],
    )
    compile_mode = trainer_cfg["compile"] or profile["compile"]
    if compile_mode not in COMPILE_MODES:
        raise ValueError(
            f"trainer.compile must be one of {COMPILE_MODES}, got {compile_mode!r}: none runs "
            "eagerly (the reference); reduce-overhead adds CUDA graphs to the compiled step."
        )
    return DeviceSettings(
        device=device,
        precision=precision,
        loader=loader,
        compile_mode=compile_mode,
        fused_optimizer=profile["fused_optimizer"],
        tf32=profile["tf32"],
        cudnn_benchmark=profile["cudnn_benchmark"],
        channels_last=profile["channels_last"],
    )
