"""The one strict way from plain values (a config section made plain, an export's JSON) to a
config dataclass: a key the dataclass does not describe, at any depth, is refused with its close
match rather than ignored. Plain Python only: the models build their configs through it.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from ldm.config.keys import described_dataclass, refuse_unknown_keys

Config = TypeVar("Config")


def dataclass_from_dict(cls: type[Config], values: Mapping[str, Any], section: str) -> Config:
    """``cls`` built from ``values``, ``section`` being where they sit in the config
    (``model.vae``), for the error messages.

    Every unknown key is named at once. Nested dataclass fields (``X`` or ``X | None``) are built
    from their mappings and ``Path`` fields from strings; keys left out keep the dataclass's
    defaults, and the dataclass checks its values itself.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{section} must be a mapping of keys to values, got {values!r}.")
    refuse_unknown_keys(values, cls, section)
    return _build(cls, values)


def _build(cls: type[Config], values: Mapping[str, Any]) -> Config:
    hints = typing.get_type_hints(cls)
    return cls(**{name: _field_value(hints[name], value) for name, value in values.items()})


def _field_value(annotation: Any, value: Any) -> Any:
    nested = described_dataclass(annotation)
    if nested is not None and isinstance(value, Mapping):
        return _build(nested, value)
    if isinstance(value, str) and _names_path(annotation):
        return Path(value)
    return value


def _names_path(annotation: Any) -> bool:
    return annotation is Path or Path in typing.get_args(annotation)
