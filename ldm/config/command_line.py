"""Command-line overrides Hydra itself cannot explain, refused before it composes.

``experiment=null`` (any config group set to null) makes Hydra fail inside its defaults list
with a ValueError traceback that names neither the override nor the options; a group takes one
of its option files, so this says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ldm.config import CONF_DIR


def refuse_null_config_groups(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Exit with one message if an override sets a config group (a folder of ``conf_dir``)
    to null; other overrides are Hydra's to check."""
    for override in overrides:
        key, has_value, value = override.partition("=")
        group = key.lstrip("+~")
        folder = conf_dir / group
        if has_value and value.strip() == "null" and folder.is_dir():
            options = sorted(path.stem for path in folder.glob("*.yaml"))
            raise SystemExit(
                f"error: {override}: the config group '{group}' takes one of its options, "
                f"not null; choose one of {' | '.join(options)} (conf/{group}/)."
            )
