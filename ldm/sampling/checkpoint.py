"""Finding and safely loading everything sampling needs from one trained U-Net checkpoint.

``ckpt=`` may name a U-Net export (the ``export/`` directory train_unet.py writes, or its
``unet.json``), the run directory holding one, or a Lightning ``.ckpt``. Each gives the same
``SamplingCheckpoint``: the U-Net with the chosen weights plus what training recorded beside it
(noise schedule, text-encoder config, VAE export and its fingerprint, latent scale and shape).

Nothing beyond tensors and plain containers is ever unpickled, and the model class comes from
our own code (``UNet``), never from a class name stored in the file.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.exports import (
    METADATA_FILENAME,
    UNET_METADATA_FILENAME,
    UNET_WEIGHTS_FILENAMES,
    file_fingerprint,
    load_unet_export,
    load_vae_export,
)
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE
from ldm.sampling.errors import SamplingError

WEIGHT_CHOICES = tuple(UNET_WEIGHTS_FILENAMES)  # ("raw", "ema")
WHAT_CKPT_IS = (
    "Pass ckpt= a U-Net export directory (runs/unet/<run>/export), its run directory "
    "(runs/unet/<run>) or a Lightning checkpoint (runs/unet/<run>/checkpoints/last.ckpt); "
    "train one with `python train_unet.py`."
)
# Where the U-Net's weights live in a LatentDiffusionModule's state_dict.
LIGHTNING_PREFIXES = {"raw": "unet.", "ema": "ema.module."}
# What training records about the U-Net, under these names in unet.json and (hyper_parameters
# plus their `provenance`) in a Lightning checkpoint.
RECORDED_KEYS = (
    "diffusion",
    "text_encoder",
    "latent_scale",
    "latent_shape",
    "context_length",
    "image_size",
    "vae_export",
    "vae_weights_sha256",
)


@dataclass(frozen=True)
class SamplingCheckpoint:
    """A U-Net ready to sample, and everything it was trained with that sampling must match."""

    source: Path  # the export directory or the .ckpt file that was read
    weights: str  # "ema" | "raw"
    fingerprint: str  # sha256 of the U-Net weights file (export) or of the .ckpt file
    unet: UNet
    diffusion: dict[str, Any]  # ldm.diffusion.ScheduleConfig fields
    text_encoder: dict[str, Any]  # ldm.text.TextEncoderConfig fields
    latent_scale: float
    latent_shape: tuple[int, int, int]
    context_length: int
    image_size: int
    vae_export: Path
    vae_weights_sha256: str


def load_sampling_checkpoint(path: str | Path, weights: str = "ema") -> SamplingCheckpoint:
    """The U-Net (``ema`` or ``raw`` weights, eval mode, CPU) and its recorded context."""
    if weights not in WEIGHT_CHOICES:
        raise SamplingError(
            f"weights={weights!r} is not one of {WEIGHT_CHOICES}: ema (the default) samples "
            "with the averaged weights, raw with the last trained ones."
        )
    # Resolved, so the record names the run itself, not a `latest` link that moves on.
    location = locate_checkpoint(Path(path)).resolve()
    if location.suffix == ".ckpt":
        return _from_lightning_checkpoint(location, weights)
    return _from_export(location, weights)


def locate_checkpoint(path: Path) -> Path:
    """The U-Net export directory or ``.ckpt`` file that ``path`` points at.

    A VAE export, or a run directory without an export, is refused with a message naming what
    was found instead, so a mix-up of the two stages' outputs is obvious.
    """
    if not path.exists():
        raise SamplingError(f"ckpt={path} does not exist. {WHAT_CKPT_IS}")
    if path.is_file():
        if path.suffix == ".ckpt":
            return path
        if path.name == UNET_METADATA_FILENAME:
            return path.parent
        if path.name == METADATA_FILENAME:
            raise _vae_export_given(path.parent)
        raise SamplingError(
            f"ckpt={path} is neither a Lightning checkpoint (.ckpt) nor a U-Net export "
            f"({UNET_METADATA_FILENAME}). {WHAT_CKPT_IS}"
        )
    candidates = (path, path / "export")
    for folder in candidates:
        if (folder / UNET_METADATA_FILENAME).is_file():
            return folder
    for folder in candidates:
        if (folder / METADATA_FILENAME).is_file():
            raise _vae_export_given(folder)
    checkpoints = sorted((path / "checkpoints").glob("*.ckpt"))
    hint = (
        f" It has Lightning checkpoints, which load too: ckpt={checkpoints[-1]}."
        if checkpoints
        else ""
    )
    raise SamplingError(
        f"No U-Net export in {path}: neither {path / UNET_METADATA_FILENAME} nor "
        f"{path / 'export' / UNET_METADATA_FILENAME} exists (an unfinished run exports "
        f"nothing).{hint} {WHAT_CKPT_IS}"
    )


def load_matching_vae(checkpoint: SamplingCheckpoint, vae_export: str | Path | None = None) -> VAE:
    """The VAE whose latents the U-Net was trained on, refusing any other by fingerprint.

    A retrained or replaced VAE decodes the U-Net's latents into garbage without any error, so
    its weights' SHA-256 must equal the one recorded at training time.
    """
    path = Path(vae_export) if vae_export is not None else checkpoint.vae_export
    named_by = "vae_export=" if vae_export is not None else f"the checkpoint {checkpoint.source}"
    try:
        vae, metadata = load_vae_export(path)
    except FileNotFoundError as error:
        raise SamplingError(
            f"The VAE export named by {named_by} cannot be found: {error} If it moved, pass "
            f"vae_export=<its new directory> (its weights sha256 must be "
            f"{checkpoint.vae_weights_sha256})."
        ) from None
    except ValueError as error:
        raise SamplingError(f"Cannot load the VAE export {path}: {error}") from None
    if metadata["weights_sha256"] != checkpoint.vae_weights_sha256:
        raise SamplingError(
            f"The VAE export {path} has weights sha256 {metadata['weights_sha256']}, but the U-Net "
            f"in {checkpoint.source} was trained on latents of the VAE with sha256 "
            f"{checkpoint.vae_weights_sha256}: the VAE was retrained or replaced since. Pass "
            "vae_export= the VAE export the U-Net was trained with, or train the U-Net again on "
            "this VAE (`python train_unet.py vae_export=...`)."
        )
    return vae


def _vae_export_given(folder: Path) -> SamplingError:
    return SamplingError(
        f"{folder} is a VAE export (written by train_vae.py), not a U-Net one; sampling needs "
        f"the U-Net, which names its VAE itself. {WHAT_CKPT_IS}"
    )


def _from_export(folder: Path, weights: str) -> SamplingCheckpoint:
    try:
        unet, metadata = load_unet_export(folder, weights=weights)
    except (ValueError, FileNotFoundError) as error:
        raise SamplingError(f"Cannot load the U-Net export {folder}: {error}") from None
    return _checkpoint(
        folder / UNET_METADATA_FILENAME,
        metadata,
        source=folder,
        weights=weights,
        fingerprint=metadata["weights_sha256"][weights],
        unet=unet,
    )


def _from_lightning_checkpoint(path: Path, weights: str) -> SamplingCheckpoint:
    state = _read_tensors_only(path)
    hparams = state.get("hyper_parameters") if isinstance(state, dict) else None
    if not isinstance(hparams, dict) or not isinstance(state.get("state_dict"), dict):
        raise SamplingError(
            f"{path} is not a Lightning checkpoint of train_unet.py: it has no "
            f"hyper_parameters and state_dict. {WHAT_CKPT_IS}"
        )
    if "unet" not in hparams:
        stage = "a VAE checkpoint (train_vae.py)" if "kl_weight" in hparams else "not a U-Net one"
        raise SamplingError(
            f"{path} is {stage}: its hyper_parameters {sorted(hparams)} name no U-Net. "
            f"{WHAT_CKPT_IS}"
        )
    recorded = {**hparams, **(hparams.get("provenance") or {})}
    unet = _unet_from_state(path, hparams["unet"], state["state_dict"], weights)
    return _checkpoint(
        path, recorded, source=path, weights=weights, fingerprint=file_fingerprint(path), unet=unet
    )


def _read_tensors_only(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle that would build any
    other object (and so could run code) is refused before anything runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise SamplingError(
            f"Refusing to load {path}: it holds pickled Python objects other than tensors and "
            "plain containers, and unpickling those can run arbitrary code. Checkpoints written "
            "by train_unet.py never contain any, so this file is corrupted, from another program, "
            f"or crafted ({first_line}). Use a U-Net export (safetensors) or a .ckpt you trained."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise SamplingError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
            f"{str(error).strip()[:200]}); it may be truncated or another kind of file. "
            f"{WHAT_CKPT_IS}"
        ) from None


def _unet_from_state(
    path: Path, unet_config: dict[str, Any], state_dict: dict[str, Any], weights: str
) -> UNet:
    prefix = LIGHTNING_PREFIXES[weights]
    tensors = {
        key.removeprefix(prefix): value
        for key, value in state_dict.items()
        if key.startswith(prefix) and isinstance(value, Tensor)
    }
    if not tensors:
        other = "raw" if weights == "ema" else "ema"
        raise SamplingError(
            f"{path} holds no {weights} U-Net weights (no state_dict keys starting with "
            f"{prefix!r}); try weights={other}."
        )
    try:
        unet = UNet(UNetConfig.from_dict(unet_config))
        unet.load_state_dict(tensors, strict=True)
    except (ValueError, RuntimeError) as error:
        summary = " ".join(str(error).split())[:300]
        raise SamplingError(
            f"The {weights} U-Net weights in {path} do not fit the U-Net config it records "
            f"({summary}). The checkpoint comes from an incompatible version of train_unet.py; "
            "use its export directory or train again."
        ) from None
    return unet.eval()


def _checkpoint(described_in: Path, recorded: dict[str, Any], **loaded: Any) -> SamplingCheckpoint:
    missing = [key for key in RECORDED_KEYS if key not in recorded]
    if missing:
        raise SamplingError(
            f"{described_in} does not record {missing}, which sampling needs: it was written by "
            "an incompatible (older) version of train_unet.py. Train or export the U-Net again "
            "with this version."
        )
    return SamplingCheckpoint(
        **loaded,
        diffusion=dict(recorded["diffusion"]),
        text_encoder=dict(recorded["text_encoder"]),
        latent_scale=float(recorded["latent_scale"]),
        latent_shape=tuple(recorded["latent_shape"]),
        context_length=int(recorded["context_length"]),
        image_size=int(recorded["image_size"]),
        vae_export=Path(recorded["vae_export"]),
        vae_weights_sha256=str(recorded["vae_weights_sha256"]),
    )
