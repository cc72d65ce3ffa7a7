"""open_clip logs through the root logger, so its chatter lands in every run's log as
``[root][INFO]`` lines (and in a plain script configures the root logger behind the user's back).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip


class OpenClipChatter(logging.Filter):
    """open_clip's INFO lines about configs, tokenizers and checkpoints, and its warning on a
    random init (`load_text_tower` gives that one itself, with the fix)."""

    def __init__(self) -> None:
        super().__init__()
        self._package = str(Path(open_clip.__file__).parent)

    def filter(self, record: logging.LogRecord) -> bool:
        from_open_clip = record.pathname.startswith(self._package)
        chatter = record.levelno < logging.WARNING or record.getMessage().startswith(
            "No pretrained weights loaded"
        )
        return not (from_open_clip and chatter)


@contextmanager
def open_clip_chatter_dropped() -> Iterator[None]:
    """While open_clip builds a model or tokenizer, drop its chatter; its other warnings pass.

    A NullHandler stands in while the root logger has none, so that open_clip's module-level
    ``logging.info`` calls do not ``basicConfig`` the root logger of the user's process."""
    root = logging.getLogger()
    chatter = OpenClipChatter()
    stand_in = logging.NullHandler() if not root.handlers else None
    if stand_in is not None:
        root.addHandler(stand_in)
    root.addFilter(chatter)
    try:
        yield
    finally:
        root.removeFilter(chatter)
        if stand_in is not None:
            root.removeHandler(stand_in)
