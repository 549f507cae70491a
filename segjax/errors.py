"""User errors (a mistake or a damaged input, not a bug) and the one way entry points report them:
one line `error: ...` on stderr, exit status 2.

Light on purpose (no JAX): the data tools use `guarded` and `ArgumentParser` too.
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from segjax.config import ConfigError
from segjax.data.errors import DataError

EXIT_USAGE = 2


class CheckpointError(ValueError):
    """A checkpoint step that cannot be read (damaged, truncated, incomplete); names the step."""


USER_ERRORS = (ConfigError, DataError, FileNotFoundError, CheckpointError)


def report(error: object) -> int:
    """Prints a user error as one line on stderr; returns the exit status."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return EXIT_USAGE


def guarded(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps an entry point's `main`: a user error prints `error: ...` on stderr and returns 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            return report(e)

    return run


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes (a bad choice, a missing or unknown flag) are one line and
    exit status 2 like every other user error, without argparse's usage dump (`--help` has it)."""

    def error(self, message: str):
        sys.exit(report(f"{message} (see {self.prog} --help)"))

