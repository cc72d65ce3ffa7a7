"""One progress-bar style for every long loop outside Lightning's own bars."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(
    items: Iterable[T], *, total: int | None = None, description: str = "", enabled: bool = True
) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar; ``enabled=False`` (or a quiet environment) shows nothing."""
    yield from tqdm(items, total=total, desc=description, disable=not enabled, dynamic_ncols=True)
