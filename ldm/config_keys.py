"""Unknown config keys, refused with the close match a typo was most likely meant to be.

Every strict config parser and the stage-start check report unknown keys through here, so a
mistyped key reads the same wherever it is caught. Plain Python only: any layer may import it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


class UnknownConfigKeyError(ValueError):
    """The config holds a key nothing reads (a typo, or a ``+key`` Hydra accepted)."""


def close_match(name: str, known: Iterable[str]) -> str | None:
    """The known key ``name`` is most likely a typo of, or None when none is close."""
    matches = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_line(section: str, name: str, value: Any, known: Iterable[str]) -> str:
    """One line naming the unknown key, its value and the close match, e.g.
    ``optim.lrr=0.001: did you mean optim.lr?``."""
    known = sorted(known)
    prefix = f"{section}." if section else ""
    guess = close_match(name, known)
    if guess:
        hint = f"did you mean {prefix}{guess}?"
    else:
        hint = f"{section or 'the top level'} has only {', '.join(known)}"
    return f"{prefix}{name}={value!r}: {hint}"


def refuse_unknown_keys(section: str, values: Mapping[str, Any], known: Iterable[str]) -> None:
    """Raise :class:`UnknownConfigKeyError` naming every key of ``values`` not in ``known``.

    ``section`` is the config path of ``values`` (``data``, ``model.unet``; ``""`` for the top).
    """
    known = set(known)
    lines = [
        unknown_key_line(section, name, value, known)
        for name, value in values.items()
        if name not in known
    ]
    if lines:
        raise UnknownConfigKeyError(unknown_keys_message(lines))


def unknown_keys_message(lines: list[str]) -> str:
    """The error for one or more :func:`unknown_key_line` results."""
    return (
        "Unknown config key(s): nothing reads them, so the run would silently keep the "
        "defaults they were meant to change.\n  " + "\n  ".join(lines) + "\nFix the spelling "
        "or drop the key."
    )
