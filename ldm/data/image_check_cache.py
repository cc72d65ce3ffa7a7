"""Remembering which image files already decoded cleanly, so a 118k-image check runs once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class ImageCheckCache:
    """Check results keyed by file path, valid while the file's size and mtime are unchanged."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _file_for(self, folder: Path) -> Path:
        digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
        return self.directory / f"image-checks-{digest}.json"

    @staticmethod
    def _signature(path: Path) -> list[int] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return [stat.st_size, stat.st_mtime_ns]

    def _read(self, folder: Path) -> dict[str, list]:
        try:
            return json.loads(self._file_for(folder).read_text())
        except (OSError, ValueError):
            return {}

    def lookup(self, paths: list[Path]) -> dict[Path, str | None]:
        """Results still valid for ``paths`` (a missing entry means: check again)."""
        found: dict[Path, str | None] = {}
        by_folder: dict[Path, list[Path]] = {}
        for path in paths:
            by_folder.setdefault(path.parent, []).append(path)
        for folder, folder_paths in by_folder.items():
            entries = self._read(folder)
            for path in folder_paths:
                entry = entries.get(path.name)
                if entry and entry[:2] == self._signature(path):
                    found[path] = entry[2]
        return found

    def store(self, results: dict[Path, str | None]) -> None:
        """Merge new results in, writing through a temporary file so readers never see half."""
        self.directory.mkdir(parents=True, exist_ok=True)
        by_folder: dict[Path, dict[Path, str | None]] = {}
        for path, problem in results.items():
            by_folder.setdefault(path.parent, {})[path] = problem
        for folder, folder_results in by_folder.items():
            entries = self._read(folder)
            for path, problem in folder_results.items():
                signature = self._signature(path)
                if signature is not None:
                    entries[path.name] = [*signature, problem]
            target = self._file_for(folder)
            temporary = target.with_suffix(f".tmp{os.getpid()}")
            temporary.write_text(json.dumps(entries))
            temporary.replace(target)
