"""Unknown config keys: found against the dataclass that describes a section, and refused with
the close match a typo was most likely meant to be.

The stage-start check (against the Hydra schemas) and the strict parser (exports, evaluate.py)
both report through here, so a mistyped key reads the same wherever it is caught. Plain Python
only: any layer may import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any


class UnknownConfigKeyError(ValueError):
    """The config holds a key nothing reads (a typo, or a ``+key`` Hydra accepted)."""


def refuse_unknown_keys(values: Mapping[str, Any], described_by: type, section: str) -> None:
    """Raise :class:`UnknownConfigKeyError` naming every key of ``values``, at any depth, that
    the dataclass ``described_by`` has no field for; a field typed ``Any`` or ``dict`` takes any
    keys. ``section`` is where ``values`` sit in the config (``model.unet``; ``""``: the top)."""
    lines = _unknown_key_lines(values, described_by, section)
    if lines:
        raise UnknownConfigKeyError(
            "Unknown config key(s): nothing reads them, so the run would silently keep the "
            "defaults they were meant to change.\n  " + "\n  ".join(lines) + "\nFix the "
            "spelling or drop the key."
        )


def described_dataclass(annotation: Any) -> type | None:
    """The dataclass a field annotation names, alone or as ``X | None``; None for any other."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return described_dataclass(members[0]) if len(members) == 1 else None
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    return None


def _unknown_key_lines(values: Mapping[str, Any], described_by: type, section: str) -> list[str]:
    hints = typing.get_type_hints(described_by)
    known = sorted(field.name for field in dataclasses.fields(described_by))
    prefix = f"{section}." if section else ""
    lines = []
    for name, value in values.items():
        if name not in hints:
            lines.append(f"{prefix}{name}={value!r}: {_hint(section, name, known)}")
            continue
        nested = described_dataclass(hints[name])
        if nested is not None and isinstance(value, Mapping):
            lines.extend(_unknown_key_lines(value, nested, f"{prefix}{name}"))
    return lines


def _hint(section: str, name: str, known: list[str]) -> str:
    """``did you mean optim.lr?``, or the keys there are when none is close."""
    matches = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if matches:
        return f"did you mean {section + '.' if section else ''}{matches[0]}?"
    return f"{section or 'the top level'} has only {', '.join(known)}"
