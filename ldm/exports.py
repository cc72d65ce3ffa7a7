"""Export and load trained models as safetensors weights plus a JSON description.

The exports are what stage 2 and sampling depend on, so they must load without unpickling
(no code runs on load), carry everything needed to rebuild the model, and never be left
half-written. Model classes come from this module's own code by ``model_type`` — never from a
class name stored in a file.
"""

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ldm.latent_stats import LATENT_STAT_KEYS
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, VAEConfig

FORMAT_VERSION = 1
MODEL_TYPE = "vae"
WEIGHTS_FILENAME = "vae.safetensors"
METADATA_FILENAME = "vae.json"


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in chunks so large weights never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    weights = {
        name: tensor.detach().cpu().contiguous() for name, tensor in vae.state_dict().items()
    }
    weights_path = directory / WEIGHTS_FILENAME
    metadata_path = directory / METADATA_FILENAME

    with (
        _written_atomically(weights_path) as weights_tmp,
        _written_atomically(metadata_path) as metadata_tmp,
    ):
        save_file(weights, weights_tmp)
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

    recorded = metadata.get("weights_sha256")
    actual = file_fingerprint(weights_path)
    if recorded != actual:
        raise ValueError(
            f"{weights_path} (sha256 {actual}) is not the weights file {metadata_path} "
            f"describes (sha256 {recorded}). The export is incomplete or was modified; "
            "export it again with `python train_vae.py`."
        )

    vae = VAE(VAEConfig.from_dict(metadata["model_config"]))
    weights = load_file(weights_path, device="cpu")
    problems = _state_mismatches(vae.state_dict(), weights)
    if problems:
        raise ValueError(
            f"Weights in {weights_path} do not fit the model config in {metadata_path}: "
            f"{'; '.join(problems)}. The two files come from different models; "
            "export them together with `python train_vae.py`."
        )
    vae.load_state_dict(weights, strict=True)
    return vae.to(map_location).eval(), metadata


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


_EXPORT_WRITERS = {"vae": "train_vae.py", "unet": "train_unet.py"}


def _read_metadata(metadata_path: Path, model_type: str) -> dict[str, Any]:
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{metadata_path} is not valid JSON ({error}).") from error
    if not isinstance(metadata, dict) or metadata.get("model_type") != model_type:
        found = metadata.get("model_type") if isinstance(metadata, dict) else type(metadata)
        raise ValueError(
            f"{metadata_path} describes model_type {found!r}, not {model_type!r}. "
            f"Point to a {model_type.upper()} export (the directory "
            f"{_EXPORT_WRITERS[model_type]} wrote)."
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{metadata_path} has export format version {version!r}; this code reads version "
            f"{FORMAT_VERSION}. Re-export it with this version of ldm-coco."
        )
    missing = [key for key in ("weights_sha256", "model_config") if key not in metadata]
    if missing:
        raise ValueError(f"{metadata_path} lacks {missing}; it is not a complete export.")
    return metadata


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


UNET_MODEL_TYPE = "unet"
UNET_METADATA_FILENAME = "unet.json"
UNET_WEIGHTS_FILENAMES = {"raw": "unet.safetensors", "ema": "unet_ema.safetensors"}


def save_unet_export(
    directory: str | os.PathLike[str],
    *,
    raw: UNet,
    ema: UNet,
    description: dict[str, Any],
) -> Path:
    """Write the raw and EMA U-Net weights and ``unet.json`` (config + everything sampling needs).

    ``description`` carries the diffusion schedule, text-encoder config, latent scale and shape,
    context length and the VAE export it was trained on (path and weights fingerprint), so one
    directory is all ``sample.py`` needs.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {kind: directory / name for kind, name in UNET_WEIGHTS_FILENAMES.items()}
    with (
        _written_atomically(paths["raw"]) as raw_tmp,
        _written_atomically(paths["ema"]) as ema_tmp,
        _written_atomically(directory / UNET_METADATA_FILENAME) as metadata_tmp,
    ):
        for model, temporary in ((raw, raw_tmp), (ema, ema_tmp)):
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, temporary
            )
        metadata = {
            "format_version": FORMAT_VERSION,
            "model_type": UNET_MODEL_TYPE,
            "weights_sha256": {"raw": file_fingerprint(raw_tmp), "ema": file_fingerprint(ema_tmp)},
            "model_config": raw.config.to_dict(),
            **description,
        }
        metadata_tmp.write_text(_to_json(metadata), encoding="utf-8")
    return directory


def read_unet_metadata(directory_or_json_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``unet.json`` of an export (checked: type, version, required keys)."""
    path = Path(directory_or_json_path)
    metadata_path = path if path.suffix == ".json" else path / UNET_METADATA_FILENAME
    if not metadata_path.is_file():
        raise FileNotFoundError(
            f"No U-Net export at {path}: {metadata_path} does not exist. Train one with "
            "`python train_unet.py`, or pass its run directory or export directory."
        )
    return _read_metadata(metadata_path, UNET_MODEL_TYPE)


def load_unet_export(
    directory_or_json_path: str | os.PathLike[str],
    weights: str = "ema",
    map_location: str | torch.device = "cpu",
) -> tuple[UNet, dict[str, Any]]:
    """Rebuild the U-Net with its ``ema`` (default) or ``raw`` weights; eval mode, no pickle."""
    if weights not in UNET_WEIGHTS_FILENAMES:
        raise ValueError(f"weights must be one of {list(UNET_WEIGHTS_FILENAMES)}, got {weights!r}")
    metadata = read_unet_metadata(directory_or_json_path)
    path = Path(directory_or_json_path)
    folder = path.parent if path.suffix == ".json" else path
    weights_path = folder / UNET_WEIGHTS_FILENAMES[weights]
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing; export the U-Net again.")
    recorded = metadata["weights_sha256"].get(weights)
    if recorded != file_fingerprint(weights_path):
        raise ValueError(
            f"{weights_path} is not the file {folder / UNET_METADATA_FILENAME} describes; the "
            "export is incomplete or was modified. Export it again with `python train_unet.py`."
        )
    unet = UNet(UNetConfig.from_dict(metadata["model_config"]))
    state = load_file(weights_path, device="cpu")
    problems = _state_mismatches(unet.state_dict(), state)
    if problems:
        raise ValueError(f"Weights in {weights_path} do not fit its config: {'; '.join(problems)}")
    unet.load_state_dict(state, strict=True)
    return unet.to(map_location).eval(), metadata
