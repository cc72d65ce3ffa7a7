"""How encoded caches live on disk: a folder of ``.npy`` arrays plus ``cache.json``.

The JSON holds a *key* — everything the arrays depend on (model fingerprint, data config, image
files) — and a cache is used only when its key equals the one wanted now. Stage-2 caches live in
folders named after their key's digest (:func:`keyed_folder`), so a cache built for another key
stays where it is and is found again when a run returns to that key. A folder becomes visible
under its final name only by a rename after every array and the JSON are written, so an
interrupted build never leaves a cache that looks complete. Building restarts from scratch; it
does not resume. Arrays open with ``mmap_mode="r"``: a 118k-image cache opens at once and costs
only the pages actually read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm.config.parse import dataclass_from_dict

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILENAME = "cache.json"
CACHE_POLICIES = ("rebuild", "error")
CACHE_DEVICES = ("auto", "cpu", "cuda")


class CacheMismatchError(ValueError):
    """An existing cache was built from something else, and ``cache.policy=error`` forbids
    rebuilding it."""


@dataclass(frozen=True)
class CacheConfig:
    """Mirrors ``conf/cache/default.yaml``; see that file for what each key means."""

    dir: Path
    policy: str = "rebuild"
    batch_size: int = 64
    text_max_positions: int | None = 32
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))
        if self.device not in CACHE_DEVICES:
            raise ValueError(f"cache.device must be one of {CACHE_DEVICES}, got {self.device!r}")
        if self.policy not in CACHE_POLICIES:
            raise ValueError(f"cache.policy must be one of {CACHE_POLICIES}, got {self.policy!r}")
        if self.batch_size < 1:
            raise ValueError(f"cache.batch_size must be at least 1, got {self.batch_size}")
        if self.text_max_positions is not None and self.text_max_positions < 2:
            raise ValueError(
                "cache.text_max_positions must be null or at least 2 (start and end tokens), "
                f"got {self.text_max_positions}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CacheConfig:
        return dataclass_from_dict(cls, values, "cache")


def key_differences(cached: Any, wanted: Any, path: str = "") -> list[str]:
    """Readable differences between two JSON-like keys, e.g. ``data.image_size: 64 → 128``."""
    if isinstance(cached, dict) and isinstance(wanted, dict):
        differences = []
        for name in sorted(set(cached) | set(wanted)):
            where = f"{path}.{name}" if path else name
            if name not in cached:
                differences.append(f"{where}: absent → {wanted[name]!r}")
            elif name not in wanted:
                differences.append(f"{where}: {cached[name]!r} → absent")
            else:
                differences.extend(key_differences(cached[name], wanted[name], where))
        return differences
    return [] if cached == wanted else [f"{path or 'key'}: {cached!r} → {wanted!r}"]


def keyed_folder(parent: Path, name: str, key: dict[str, Any]) -> Path:
    """``parent/{name}-{digest}``, the digest being 16 hex digits of SHA-256 over the key (and
    the format version) as canonical JSON: one folder per key, so switching back to an earlier
    key (another ``data.subset``, the previous VAE) reuses its cache instead of rebuilding it."""
    canonical = json.dumps({"format_version": FORMAT_VERSION, "key": key}, sort_keys=True)
    return parent / f"{name}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def read_metadata(folder: Path) -> dict[str, Any] | None:
    """The folder's ``cache.json``, or None when there is no readable one."""
    try:
        metadata = json.loads((folder / METADATA_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) else None


def open_complete_cache(
    folder: Path, kind: str, build_hint: str, arrays: Sequence[str]
) -> dict[str, Any]:
    """The fields of an opened ``kind`` cache: ``folder``, its ``metadata`` (``cache.json``) and
    each of ``arrays`` (``{name}.npy``) as a read-only memory map; when ``folder`` holds no
    complete ``kind`` cache, an error that says how to build one (``build_hint``)."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    if metadata is None or metadata.get("kind") != kind:
        raise FileNotFoundError(f"No {kind} cache at {folder}. {build_hint}")
    return {"folder": folder, "metadata": metadata} | {
        name: open_array(folder, f"{name}.npy") for name in arrays
    }


def cache_is_current(folder: Path, kind: str, key: dict[str, Any], policy: str) -> bool:
    """True when ``folder`` holds a complete ``kind`` cache built for ``key``.

    A stale cache is reported and left to be rebuilt, or refused under ``policy="error"``
    with what differs; a missing or unreadable one simply needs building.
    """
    metadata = read_metadata(folder)
    if metadata is None or metadata.get("kind") != kind:
        return False
    differences = key_differences(
        {"format_version": metadata.get("format_version"), "key": metadata.get("key")},
        {"format_version": FORMAT_VERSION, "key": key},
    )
    missing = [name for name in metadata.get("files", []) if not (folder / name).is_file()]
    differences += [f"file {name}: missing" for name in missing]
    if not differences:
        return True
    summary = "; ".join(differences)
    if policy == "error":
        raise CacheMismatchError(
            f"The {kind} cache at {folder} does not match this run (cached → now): {summary}. "
            "Delete the folder or set cache.policy=rebuild to rebuild it, or point cache.dir "
            "at another folder to keep it."
        )
    log.warning(
        "Rebuilding the %s cache at %s, which does not match (cached → now): %s",
        kind,
        folder,
        summary,
    )
    return False


def keyed_cache_is_current(folder: Path, kind: str, key: dict[str, Any], policy: str) -> bool:
    """:func:`cache_is_current` for a :func:`keyed_folder`; when it holds no cache yet, the
    closest cache of the same name beside it (built for another key) is named with what differs:
    as a note before building, or as the refusal under ``policy="error"``."""
    if cache_is_current(folder, kind, key, policy):
        return True
    if read_metadata(folder) is not None:
        return False  # a damaged cache at this key: cache_is_current has said what is wrong
    name = folder.name.rpartition("-")[0]
    others = [
        (other, key_differences(metadata.get("key"), key))
        for other in sorted(folder.parent.glob(f"{name}-*"))
        if ".partial-" not in other.name
        and (metadata := read_metadata(other)) is not None
        and metadata.get("kind") == kind
    ]
    if not others:
        return False
    closest, differences = min(others, key=lambda other: len(other[1]))
    summary = "; ".join(differences)
    if policy == "error":
        raise CacheMismatchError(
            f"No {kind} cache under {folder.parent} matches this run; the closest, {closest.name}, "
            f"was built from something else (cached → now): {summary}. Set cache.policy=rebuild "
            "to build one beside it (the existing caches are kept), or undo the change."
        )
    log.info(
        "Building a new %s cache at %s; the closest existing one, %s, differs (cached → now): %s",
        kind,
        folder,
        closest.name,
        summary,
    )
    return False


def open_array(folder: Path, name: str) -> np.ndarray:
    """A read-only memory map of ``folder/name`` (nothing is read until it is indexed)."""
    return np.load(folder / name, mmap_mode="r")


class CacheWriter:
    """Files being written into a hidden staging folder; see :func:`building_cache`."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.arrays: dict[str, np.memmap] = {}
        self.files: list[str] = []

    def new_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.memmap:
        """A writable ``.npy`` memory map, so a cache larger than RAM is written in place."""
        array = np.lib.format.open_memmap(
            self.staging / name, mode="w+", dtype=np.dtype(dtype), shape=shape
        )
        self.arrays[name] = array
        self.files.append(name)
        return array

    def write_json(self, name: str, value: Any) -> None:
        """A small JSON side file (e.g. the captions), listed with the arrays."""
        (self.staging / name).write_text(json.dumps(value), encoding="utf-8")
        self.files.append(name)

    def finish(self, kind: str, key: dict[str, Any], details: dict[str, Any]) -> None:
        """Flush every array to disk, then write ``cache.json`` — the last file a build writes."""
        for array in self.arrays.values():
            array.flush()
        for name in self.files:
            _fsync(self.staging / name)
        metadata = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "key": key,
            "files": sorted(self.files),
            **details,
        }
        path = self.staging / METADATA_FILENAME
        path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        _fsync(path)


@contextmanager
def building_cache(folder: Path) -> Iterator[CacheWriter]:
    """Write a cache into a staging sibling of ``folder``; on success swap it into place.

    On any exception the staging folder is removed and ``folder`` keeps whatever it held
    before; a process killed outright leaves only a ``.partial-*`` folder, which the next build
    removes. The old cache is moved aside before the new one is renamed in, so a crash between
    the two renames leaves no cache (rebuilt next time), never a mixed one.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    for leftover in folder.parent.glob(f"{folder.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        writer = CacheWriter(staging)
        yield writer
        writer.arrays.clear()  # release the memory maps before renaming
        retired = folder.with_name(f"{folder.name}.partial-old-{uuid.uuid4().hex[:12]}")
        if folder.exists():
            os.replace(folder, retired)
        os.replace(staging, folder)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())
