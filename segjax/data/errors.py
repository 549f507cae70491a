"""Data errors, the skip counter and the skip reasons shared by the data sources."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable

# Skip reasons the sources share, one spelling each (formats add their own beside their rules).
IMAGE_MISSING = "image_missing"  # a listed image file is not on disk
MASK_MISSING = "mask_missing"  # a listed mask file is not on disk
IMAGE_UNREADABLE = "image_unreadable"  # an image cannot be decoded
MASK_UNREADABLE = "mask_unreadable"  # a mask cannot be decoded
SIZE_MISMATCH = "size_mismatch"  # image and mask (or annotation) sizes differ
IMAGE_WITHOUT_MASK = "image_without_mask"  # a folder image with no mask of the same stem
MASK_WITHOUT_IMAGE = "mask_without_image"  # a folder mask with no image of the same stem
DUPLICATE_STEM = "duplicate_stem"  # two images (or masks) share a stem, e.g. x.jpg and x.png: ambiguous


class DataError(Exception):
    """A fatal, clearly described problem with a data set (bad file, wrong format)."""


@dataclasses.dataclass
class SkipReport:
    """Counts skipped records per named reason, keeping a few example ids per reason."""

    max_examples: int = 3
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[Hashable]] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, example: Hashable | None = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if example is not None and len(shown) < self.max_examples:
            shown.append(example)

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
