"""Collecting skipped inputs so they are reported once, with counts and examples, or refused."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ON_BAD_INPUT_CHOICES = ("warn", "error")
MAX_EXAMPLES_PER_KIND = 3


class BadInputError(ValueError):
    """Raised instead of skipping when the user asked for ``data.on_bad_input=error``."""


@dataclass
class BadInputReport:
    """Problems found in one data source, grouped by kind (e.g. 'missing image file')."""

    source: str
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, example: str) -> None:
        self.problems[kind].append(example)

    @property
    def total(self) -> int:
        return sum(len(examples) for examples in self.problems.values())

    def count(self, kind: str) -> int:
        return len(self.problems.get(kind, []))

    def summary(self, outcome: str = "skipped") -> str:
        lines = [f"{self.total} bad input(s) {outcome} in {self.source}:"]
        for kind, examples in sorted(self.problems.items()):
            shown = ", ".join(examples[:MAX_EXAMPLES_PER_KIND])
            more = len(examples) - MAX_EXAMPLES_PER_KIND
            suffix = f" (+{more} more)" if more > 0 else ""
            lines.append(f"  - {kind}: {len(examples)} (e.g. {shown}{suffix})")
        return "\n".join(lines)

    def resolve(self, on_bad_input: str) -> None:
        """Warn once with the whole summary, or raise when bad input is not to be tolerated."""
        if on_bad_input not in ON_BAD_INPUT_CHOICES:
            raise ValueError(
                f"data.on_bad_input must be one of {ON_BAD_INPUT_CHOICES}, got {on_bad_input!r}"
            )
        if not self.total:
            return
        if on_bad_input == "error":
            raise BadInputError(
                self.summary("found")
                + "\nFix or remove these files, or set data.on_bad_input=warn "
                "to skip them."
            )
        log.warning(self.summary())
