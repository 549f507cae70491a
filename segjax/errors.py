"""User errors (a mistake or a damaged input, not a bug) and the one way entry points report them.

Light on purpose (no JAX): the data tools use `guarded` too.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from segjax.config import ConfigError
from segjax.data.errors import DataError


class CheckpointError(ValueError):
    """A checkpoint step that cannot be read (damaged, truncated, incomplete); names the step."""


USER_ERRORS = (ConfigError, DataError, FileNotFoundError, CheckpointError)


def guarded(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps an entry point's `main`: a user error prints `error: ...` on stderr and returns 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run
