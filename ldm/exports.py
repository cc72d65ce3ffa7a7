"""Trained models as safetensors weights plus a JSON description, and the one way to load them.

The exports are what stage 2 and sampling depend on, so they must load without unpickling
(no code runs on load), carry everything needed to rebuild the model, and never be left
half-written. Model classes come from this module's own code by ``model_type`` (and, in a U-Net
export, ``denoiser``: ``unet`` or ``dit``) — never from a class name stored in a file.

A U-Net export exists in memory too (``UNetExport``): the training module builds it, the stage
runner writes it as files and every Lightning checkpoint carries it under ``"export"``. So a
``.ckpt`` and an export folder load through the same ``unet_from_export``, and nothing that
samples needs to know how the training module names its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldm.latent_norm import LatentNormalizer
from ldm.latent_stats import LATENT_STAT_KEYS
from ldm.models.denoiser import DEFAULT_DENOISER, Denoiser, build_denoiser, denoiser_name
from ldm.models.vae import VAE, VAEConfig

FORMAT_VERSION = 1
MODEL_TYPE = "vae"
WEIGHTS_FILENAME = "vae.safetensors"
METADATA_FILENAME = "vae.json"
UNET_MODEL_TYPE = "unet"
UNET_METADATA_FILENAME = "unet.json"
UNET_WEIGHTS_FILENAMES = {"raw": "unet.safetensors", "ema": "unet_ema.safetensors"}
UNET_WEIGHT_CHOICES = tuple(UNET_WEIGHTS_FILENAMES)  # ("raw", "ema")
CHECKPOINT_EXPORT_KEY = "export"  # where a Lightning checkpoint carries its UNetExport
# What training records about the U-Net in its export, and sampling needs.
RECORDED_KEYS = (
    "diffusion",
    "text_encoder",
    "latent_norm",  # LatentNormalizer.describe(); older exports: latent_scale
    "latent_shape",
    "context_length",
    "image_size",
    "vae_export",
    "vae_weights_sha256",
)
WHAT_CKPT_IS = (
    "Pass ckpt= a U-Net export directory (runs/unet/<run>/export), its run directory "
    "(runs/unet/<run>) or a Lightning checkpoint (runs/unet/<run>/checkpoints/last.ckpt); "
    "train one with `python train_unet.py`."
)
_EXPORT_WRITERS = {MODEL_TYPE: "train_vae.py", UNET_MODEL_TYPE: "train_unet.py"}

_Model = TypeVar("_Model", bound=nn.Module)


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in chunks so large weights never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the VAE ------------------------------------------------------------------------------------


def save_vae_export(
    directory: str | os.PathLike[str],
    vae: VAE,
    *,
    latent_stats: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `vae.safetensors` and `vae.json` into `directory` and return the directory.

    Each file is written to a temporary name and renamed into place, so a crash leaves
    either the old file or the new one. The JSON records the weights' SHA-256, so a crash
    between the two renames, which would pair one export's JSON with another's weights, is
    caught on load instead of going unnoticed.
    """
    missing = [key for key in LATENT_STAT_KEYS if key not in latent_stats]
    if missing:
        raise ValueError(
            f"latent_stats lacks {missing}; pass the dict returned by "
            "ldm.latent_stats.measure_latent_statistics."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS_FILENAME
    metadata_path = directory / METADATA_FILENAME

    with (
        _written_atomically(weights_path) as weights_tmp,
        _written_atomically(metadata_path) as metadata_tmp,
    ):
        save_file(_plain_tensors(vae.state_dict()), weights_tmp)
        metadata = {
            "format_version": FORMAT_VERSION,
            "model_type": MODEL_TYPE,
            "weights_sha256": file_fingerprint(weights_tmp),
            "model_config": vae.config.to_dict(),
            "latent_stats": dict(latent_stats),
            "extra": dict(extra or {}),
        }
        metadata_tmp.write_text(_to_json(metadata), encoding="utf-8")
    return directory


def load_vae_export(
    directory_or_json_path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[VAE, dict[str, Any]]:
    """Rebuild the VAE from an export; returns it in eval mode with the parsed JSON.

    Only JSON and safetensors are read, so loading an untrusted export cannot run code.
    """
    metadata_path, weights_path = _export_paths(Path(directory_or_json_path))
    metadata = _read_metadata(metadata_path, MODEL_TYPE)
    weights = _read_weights(weights_path, metadata["weights_sha256"], metadata_path, MODEL_TYPE)
    vae = VAE(VAEConfig.from_dict(metadata["model_config"]))
    return _with_weights(vae, weights, weights_path, MODEL_TYPE).to(map_location), metadata


def read_vae_metadata(directory_or_json_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``vae.json`` of an export, without loading the weights: enough to validate
    a run's inputs or a latent cache before any work."""
    metadata_path, _ = _export_paths(Path(directory_or_json_path))
    return _read_metadata(metadata_path, MODEL_TYPE)


def _export_paths(path: Path) -> tuple[Path, Path]:
    """Accept either the export directory or its JSON file; both files must exist."""
    mistaken = _mistaken_for_vae_export(path)
    if mistaken:
        raise ValueError(mistaken)
    metadata_path = path if path.suffix == ".json" else path / METADATA_FILENAME
    weights_path = metadata_path.parent / WEIGHTS_FILENAME
    for required in (metadata_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"No VAE export at {path}: {required} does not exist. Train and export a VAE "
                "with `python train_vae.py`, or pass the directory holding "
                f"{METADATA_FILENAME} and {WEIGHTS_FILENAME}."
            )
    return metadata_path, weights_path


def _mistaken_for_vae_export(path: Path) -> str | None:
    """What to say when ``path`` is recognisably something else than a VAE export: a U-Net
    export or run (both stages write ``runs/<stage>/<run>/export``), a VAE run directory, or a
    checkpoint file."""
    for candidate in (
        path,
        path / UNET_METADATA_FILENAME,
        path / "export" / UNET_METADATA_FILENAME,
    ):
        if candidate.name == UNET_METADATA_FILENAME and candidate.is_file():
            return (
                f"{path} belongs to a U-Net export (train_unet.py wrote {candidate}), not a VAE "
                "export. Point vae_export at the folder train_vae.py exported: "
                "runs/vae/<run>/export (runs/vae/latest/export is the newest)."
            )
    if (path / "export" / METADATA_FILENAME).is_file():
        return f"{path} is a VAE run directory, not its export: use vae_export={path / 'export'}"
    if path.is_file() and path.suffix != ".json":
        return (
            f"{path} is a file, not a VAE export folder (vae.json + vae.safetensors): point "
            "vae_export at runs/vae/<run>/export (a VAE checkpoint is exported with "
            "`python train_vae.py train=false ckpt_path=<checkpoint>`)."
        )
    return None


# ---- the U-Net ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetExport:
    """A U-Net export in memory: ``unet.json``'s content less the files' fingerprints, and the
    raw and EMA state dicts. ``save_unet_export`` writes it as files; a training checkpoint
    carries ``as_checkpoint_entry()``."""

    metadata: dict[str, Any]  # format, model type and config, and what sampling needs
    weights: dict[str, dict[str, Tensor]]  # "raw" | "ema" → U-Net state dict

    @classmethod
    def from_models(
        cls, *, raw: Denoiser, ema: Denoiser, description: dict[str, Any]
    ) -> UNetExport:
        """The export of a trained denoiser (U-Net or DiT, recorded as ``denoiser``): its raw
        and EMA weights and ``description``.

        ``description`` carries the diffusion schedule, text-encoder config, latent norm and
        shape, context length and the VAE export it was trained on (path and weights
        fingerprint), so the export is all ``sample.py`` needs. The state dicts share their
        tensors with the models.
        """
        metadata = {
            "format_version": FORMAT_VERSION,
            "model_type": UNET_MODEL_TYPE,
            "denoiser": denoiser_name(raw),
            "model_config": raw.config.to_dict(),
            **description,
        }
        return cls(metadata, {"raw": raw.state_dict(), "ema": ema.state_dict()})

    def as_checkpoint_entry(self) -> dict[str, Any]:
        """Plain containers of tensors, which ``torch.load(weights_only=True)`` reads back."""
        return {"metadata": self.metadata, "weights": self.weights}


def save_unet_export(directory: str | os.PathLike[str], export: UNetExport) -> Path:
    """Write the raw and EMA weights and ``unet.json`` (the metadata and the weights files'
    fingerprints) into ``directory``, each file atomically; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {kind: directory / name for kind, name in UNET_WEIGHTS_FILENAMES.items()}
    with (
        _written_atomically(paths["raw"]) as raw_tmp,
        _written_atomically(paths["ema"]) as ema_tmp,
        _written_atomically(directory / UNET_METADATA_FILENAME) as metadata_tmp,
    ):
        temporaries = {"raw": raw_tmp, "ema": ema_tmp}
        for kind, temporary in temporaries.items():
            save_file(_plain_tensors(export.weights[kind]), temporary)
        fingerprints = {kind: file_fingerprint(path) for kind, path in temporaries.items()}
        metadata = {**export.metadata, "weights_sha256": fingerprints}
        metadata_tmp.write_text(_to_json(metadata), encoding="utf-8")
    return directory


def read_unet_metadata(directory_or_json_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``unet.json`` of an export (checked: type, version, required keys)."""
    return _read_metadata(_unet_metadata_path(Path(directory_or_json_path)), UNET_MODEL_TYPE)


def load_unet_export(
    directory_or_json_path: str | os.PathLike[str],
    weights: str = "ema",
    map_location: str | torch.device = "cpu",
) -> tuple[Denoiser, dict[str, Any]]:
    """Rebuild the U-Net with its ``ema`` (default) or ``raw`` weights; eval mode, no pickle."""
    _check_weight_choice(weights)
    metadata_path = _unet_metadata_path(Path(directory_or_json_path))
    metadata = _read_metadata(metadata_path, UNET_MODEL_TYPE)
    weights_path = metadata_path.parent / UNET_WEIGHTS_FILENAMES[weights]
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing; export the U-Net again.")
    recorded = metadata["weights_sha256"].get(weights)
    state = _read_weights(weights_path, recorded, metadata_path, UNET_MODEL_TYPE)
    return unet_from_export(metadata, state, source=weights_path).to(map_location), metadata


def unet_from_export(
    metadata: dict[str, Any], state_dict: dict[str, Tensor], *, source: str | Path
) -> Denoiser:
    """The denoiser ``metadata`` describes holding ``state_dict`` (its raw or EMA weights), in
    eval mode: the one way a U-Net or DiT is rebuilt, from an export folder or a checkpoint.
    Exports from before the DiT record no ``denoiser``: they hold a U-Net."""
    name = metadata.get("denoiser", DEFAULT_DENOISER)
    unet = build_denoiser(name, metadata["model_config"])
    return _with_weights(unet, state_dict, source, UNET_MODEL_TYPE)


def read_checkpoint_export(path: str | os.PathLike[str]) -> UNetExport:
    """The export a Lightning checkpoint of train_unet.py carries, read without unpickling
    anything but tensors and plain containers."""
    path = Path(path)
    state = _read_tensors_only(path)
    entry = state.get(CHECKPOINT_EXPORT_KEY) if isinstance(state, dict) else None
    if entry is None:
        raise ValueError(_why_no_export_in(path, state))
    metadata = entry.get("metadata") if isinstance(entry, dict) else None
    weights = entry.get("weights") if isinstance(entry, dict) else None
    if not isinstance(metadata, dict) or not isinstance(weights, dict):
        raise ValueError(
            f"{path} has a malformed {CHECKPOINT_EXPORT_KEY!r} entry (no metadata and weights "
            "dicts): the file is corrupted or from another program. Use its run's export."
        )
    _check_metadata(metadata, path, UNET_MODEL_TYPE, required=("model_config",))
    missing = [kind for kind in UNET_WEIGHT_CHOICES if not isinstance(weights.get(kind), dict)]
    if missing:
        raise ValueError(f"{path} carries no {missing} U-Net weights; it is not a complete export.")
    return UNetExport(metadata, weights)


@dataclass(frozen=True)
class SamplingCheckpoint:
    """A U-Net ready to sample, and everything it was trained with that sampling must match."""

    source: Path  # the export directory or the .ckpt file that was read
    weights: str  # "ema" | "raw"
    fingerprint: str  # sha256 of the U-Net weights file (export) or of the .ckpt file
    unet: Denoiser
    diffusion: dict[str, Any]  # ldm.diffusion.ScheduleConfig fields
    text_encoder: dict[str, Any]  # ldm.text.TextEncoderConfig fields
    latent_normalizer: LatentNormalizer  # VAE latents ↔ the U-Net's, as in training
    latent_shape: tuple[int, int, int]
    context_length: int
    image_size: int
    vae_export: Path
    vae_weights_sha256: str


def load_unet_for_sampling(path: str | Path, weights: str = "ema") -> SamplingCheckpoint:
    """The U-Net (``ema`` or ``raw`` weights, eval mode, CPU) and its recorded context, from a
    U-Net export (its folder, ``unet.json`` or run directory) or a Lightning ``.ckpt``."""
    _check_weight_choice(weights)
    # Resolved, so the record names the run itself, not a `latest` link that moves on.
    location = locate_unet(Path(path)).resolve()
    if location.suffix == ".ckpt":
        export = read_checkpoint_export(location)
        metadata, fingerprint = export.metadata, file_fingerprint(location)
        unet = unet_from_export(metadata, export.weights[weights], source=location)
    else:
        try:
            unet, metadata = load_unet_export(location, weights=weights)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"Cannot load the U-Net export {location}: {error}") from None
        fingerprint = metadata["weights_sha256"][weights]
    metadata = _with_latent_norm(metadata)
    missing = [key for key in RECORDED_KEYS if key not in metadata]
    if missing:
        raise ValueError(
            f"{location} does not record {missing}, which sampling needs: it was written by an "
            "incompatible (older) version of train_unet.py. Train or export the U-Net again "
            "with this version."
        )
    return SamplingCheckpoint(
        source=location,
        weights=weights,
        fingerprint=fingerprint,
        unet=unet,
        diffusion=dict(metadata["diffusion"]),
        text_encoder=dict(metadata["text_encoder"]),
        latent_normalizer=_latent_normalizer(metadata, location),
        latent_shape=tuple(metadata["latent_shape"]),
        context_length=int(metadata["context_length"]),
        image_size=int(metadata["image_size"]),
        vae_export=Path(metadata["vae_export"]),
        vae_weights_sha256=str(metadata["vae_weights_sha256"]),
    )


def _with_latent_norm(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` with its ``latent_norm``: exports from before ``latent_norm`` existed record
    only the float ``latent_scale``, which is the ``global`` kind."""
    if "latent_norm" in metadata or "latent_scale" not in metadata:
        return metadata
    return {**metadata, "latent_norm": {"kind": "global", "scale_factor": metadata["latent_scale"]}}


def _latent_normalizer(metadata: dict[str, Any], location: Path) -> LatentNormalizer:
    """The recorded normalisation, checked against the recorded latent shape."""
    try:
        return LatentNormalizer(
            metadata["latent_norm"], latent_channels=int(metadata["latent_shape"][0])
        )
    except ValueError as error:
        raise ValueError(
            f"{location} records a latent_norm that cannot be used: {error} Train or export the "
            "U-Net again."
        ) from None


def locate_unet(path: Path) -> Path:
    """The U-Net export directory or ``.ckpt`` file that ``path`` points at.

    A VAE export, or a run directory without an export, is refused with a message naming what
    was found instead, so a mix-up of the two stages' outputs is obvious.
    """
    if not path.exists():
        raise FileNotFoundError(f"ckpt={path} does not exist. {WHAT_CKPT_IS}")
    if path.is_file():
        if path.suffix == ".ckpt":
            return path
        if path.name == UNET_METADATA_FILENAME:
            return path.parent
        if path.name == METADATA_FILENAME:
            raise ValueError(_vae_export_given(path.parent))
        raise ValueError(
            f"ckpt={path} is neither a Lightning checkpoint (.ckpt) nor a U-Net export "
            f"({UNET_METADATA_FILENAME}). {WHAT_CKPT_IS}"
        )
    candidates = (path, path / "export")
    for folder in candidates:
        if (folder / UNET_METADATA_FILENAME).is_file():
            return folder
    for folder in candidates:
        if (folder / METADATA_FILENAME).is_file():
            raise ValueError(_vae_export_given(folder))
    checkpoints = sorted((path / "checkpoints").glob("*.ckpt"))
    hint = (
        f" It has Lightning checkpoints, which load too: ckpt={checkpoints[-1]}."
        if checkpoints
        else ""
    )
    raise FileNotFoundError(
        f"No U-Net export in {path}: neither {path / UNET_METADATA_FILENAME} nor "
        f"{path / 'export' / UNET_METADATA_FILENAME} exists (an unfinished run exports "
        f"nothing).{hint} {WHAT_CKPT_IS}"
    )


def _unet_metadata_path(path: Path) -> Path:
    metadata_path = path if path.suffix == ".json" else path / UNET_METADATA_FILENAME
    if not metadata_path.is_file():
        raise FileNotFoundError(
            f"No U-Net export at {path}: {metadata_path} does not exist. Train one with "
            "`python train_unet.py`, or pass its run directory or export directory."
        )
    return metadata_path


def _check_weight_choice(weights: str) -> None:
    if weights not in UNET_WEIGHT_CHOICES:
        raise ValueError(
            f"weights={weights!r} is not one of {UNET_WEIGHT_CHOICES}: ema (the default) samples "
            "with the averaged weights, raw with the last trained ones."
        )


def _vae_export_given(folder: Path) -> str:
    return (
        f"{folder} is a VAE export (written by train_vae.py), not a U-Net one; sampling needs "
        f"the U-Net, which names its VAE itself. {WHAT_CKPT_IS}"
    )


def _why_no_export_in(path: Path, state: Any) -> str:
    """What a checkpoint without an export is: a VAE's, an older train_unet.py's, or none."""
    hparams = state.get("hyper_parameters") if isinstance(state, dict) else None
    if isinstance(hparams, dict) and "kl_weight" in hparams:
        return f"{path} is a VAE checkpoint (train_vae.py), not a U-Net one. {WHAT_CKPT_IS}"
    if isinstance(hparams, dict) and "unet" in hparams:
        return (
            f"{path} was written by a train_unet.py from before checkpoints carried their export "
            f"(it has no {CHECKPOINT_EXPORT_KEY!r} entry). Sample from the export its run wrote "
            "(runs/unet/<run>/export, made by the version that trained it), or resume it with "
            f"this version (`python train_unet.py ckpt_path={path}`): the checkpoints it saves "
            "then carry the export."
        )
    return f"{path} is not a Lightning checkpoint of train_unet.py. {WHAT_CKPT_IS}"


def _read_tensors_only(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle that would build any
    other object (and so could run code) is refused before anything runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"Refusing to load {path}: it holds pickled Python objects other than tensors and "
            "plain containers, and unpickling those can run arbitrary code. Checkpoints written "
            "by train_unet.py never contain any, so this file is corrupted, from another program, "
            f"or crafted ({first_line}). Use a U-Net export (safetensors) or a .ckpt you trained."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
            f"{str(error).strip()[:200]}); it may be truncated or another kind of file. "
            f"{WHAT_CKPT_IS}"
        ) from None


# ---- shared by both exports ---------------------------------------------------------------------


def _read_metadata(metadata_path: Path, model_type: str) -> dict[str, Any]:
    """An export's JSON, checked: its model type, format version and required keys."""
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{metadata_path} is not valid JSON ({error}).") from error
    return _check_metadata(
        metadata, metadata_path, model_type, required=("weights_sha256", "model_config")
    )


def _check_metadata(
    metadata: Any, described_in: Path, model_type: str, *, required: tuple[str, ...]
) -> dict[str, Any]:
    if not isinstance(metadata, dict) or metadata.get("model_type") != model_type:
        found = metadata.get("model_type") if isinstance(metadata, dict) else type(metadata)
        raise ValueError(
            f"{described_in} describes model_type {found!r}, not {model_type!r}. "
            f"Point to a {model_type.upper()} export (the directory "
            f"{_EXPORT_WRITERS[model_type]} wrote)."
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{described_in} has export format version {version!r}; this code reads version "
            f"{FORMAT_VERSION}. Re-export it with this version of ldm-coco."
        )
    missing = [key for key in required if key not in metadata]
    if missing:
        raise ValueError(f"{described_in} lacks {missing}; it is not a complete export.")
    return metadata


def _read_weights(
    weights_path: Path, recorded_sha256: str | None, metadata_path: Path, model_type: str
) -> dict[str, Tensor]:
    """The safetensors file, refused unless it is the one ``metadata_path`` fingerprints."""
    actual = file_fingerprint(weights_path)
    if recorded_sha256 != actual:
        raise ValueError(
            f"{weights_path} (sha256 {actual}) is not the weights file {metadata_path} "
            f"describes (sha256 {recorded_sha256}). The export is incomplete or was modified; "
            f"export it again with `python {_EXPORT_WRITERS[model_type]}`."
        )
    return load_file(weights_path, device="cpu")


def _with_weights(
    model: _Model, state_dict: dict[str, Tensor], source: str | Path, model_type: str
) -> _Model:
    """``model`` holding ``state_dict``, in eval mode; weights of another shape are refused
    with what differs."""
    problems = _state_mismatches(model.state_dict(), state_dict)
    if problems:
        raise ValueError(
            f"The weights in {source} do not fit the model config recorded beside them: "
            f"{'; '.join(problems)}. The two come from different models; export them together "
            f"with `python {_EXPORT_WRITERS[model_type]}`."
        )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _state_mismatches(expected: dict[str, Tensor], found: dict[str, Tensor]) -> list[str]:
    """Human-readable differences between a model's state dict and loaded weights."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
    reshaped = [
        f"{name}: file {tuple(found[name].shape)} vs model {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in found and found[name].shape != tensor.shape
    ]
    if reshaped:
        problems.append(f"{len(reshaped)} shape mismatches (e.g. {reshaped[:3]})")
    return problems


def _plain_tensors(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """What safetensors stores: contiguous CPU tensors, detached."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}


def _to_json(metadata: dict[str, Any]) -> str:
    try:
        return json.dumps(metadata, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Export metadata is not plain JSON ({error}). latent_stats and extra must hold "
            "only finite numbers, strings, lists and dicts; convert tensors with .tolist()."
        ) from error


@contextmanager
def _written_atomically(final_path: Path) -> Iterator[Path]:
    """Yield a unique temporary path beside `final_path`; if the body succeeds, flush it to
    disk and rename it over `final_path`, otherwise delete it."""
    temporary_path = final_path.with_name(f".{final_path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary_path
        with open(temporary_path, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary_path, final_path)
    finally:
        temporary_path.unlink(missing_ok=True)
