"""Data errors and the skip counter shared by the data sources."""
from __future__ import annotations

import dataclasses
import logging
from typing import Hashable


class DataError(Exception):
    """A fatal, clearly described problem with a data set (bad file, wrong format)."""


@dataclasses.dataclass
class SkipReport:
    """Counts skipped records per named reason, keeping a few example ids per reason."""

    max_examples: int = 3
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[Hashable]] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, example: Hashable | None = None, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        shown = self.examples.setdefault(reason, [])
        if example is not None and len(shown) < self.max_examples:
            shown.append(example)

    def merge(self, other: SkipReport) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: self.max_examples - len(shown)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict]:
        """JSON-able view: reason -> {"count", "examples"}."""
        return {r: {"count": c, "examples": list(self.examples.get(r, []))} for r, c in sorted(self.counts.items())}

    def log(self, logger: logging.Logger, what: str) -> None:
        """Write one line per reason (or one line saying nothing was skipped)."""
        if not self.counts:
            logger.info("%s: nothing skipped", what)
            return
        for reason, count in sorted(self.counts.items()):
            logger.warning("%s: skipped %d (%s), e.g. %s", what, count, reason, self.examples.get(reason, []))
