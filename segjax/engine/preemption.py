"""Stopping cleanly on SIGTERM / SIGINT: finish the step, save, exit with EXIT_PREEMPTED.

SLURM and Kubernetes send SIGTERM some time before they kill a job. The handler only sets a
flag; the trainer looks at it between steps. With several processes they must all stop at the
same step (the save is collective), so they agree through a tiny all-gather at steps every
process reaches: every `sync_every` steps and at epoch ends. A second signal stops at once.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

log = logging.getLogger("segjax")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; a job script can requeue on it
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after saving `step`; `--resume` continues exactly."""

    def __init__(self, step: int, checkpoint_dir: str):
        super().__init__(f"stopped by signal after saving step {step} in {checkpoint_dir}; "
                         f"continue with --resume {checkpoint_dir}")
        self.step, self.checkpoint_dir = step, checkpoint_dir


class StopSignal:
    """Context manager that turns SIGTERM / SIGINT into a flag (main thread only)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: the user insists
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving a checkpoint and exiting "
                    "(send it again to stop at once)", self.received)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def stop_now(self, step: int, sync_every: int) -> bool:
        """Whether every process stops after `step`; with several processes it only answers at
        steps that are multiples of `sync_every` (the others return False without a collective)."""
        if jax.process_count() == 1:
            return self.received is not None
        if step % sync_every:
            return False
        return self.agree()

    def agree(self) -> bool:
        """True on every process when any of them received a signal (a collective: call it at
        the same point on all processes)."""
        if jax.process_count() == 1:
            return self.received is not None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.received is not None]))
        return bool(np.any(flags))
