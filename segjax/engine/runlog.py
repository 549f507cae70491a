"""A run directory's logs: train.log, metrics.jsonl, TensorBoard scalars. Process 0 writes."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import jax

log = logging.getLogger("segjax")


def setup_console_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False


class RunLog:
    """Writes metrics as JSON lines and TensorBoard scalars, and mirrors `segjax` log records to train.log."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.enabled = jax.process_index() == 0
        self._writer = None
        self._file_handler = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file_handler = logging.FileHandler(self.run_dir / "train.log")
            self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger("segjax").addHandler(self._file_handler)
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            self._metrics = open(self.run_dir / "metrics.jsonl", "a")

    def write(self, step: int, epoch: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "epoch": int(epoch), "split": split}
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                record[name] = None if isinstance(value, float) and math.isnan(value) else value
                if record[name] is not None:
                    self._writer.add_scalar(f"{split}/{name}", value, step)
            else:
                record[name] = value
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._metrics.close()
            self._writer.close()
            logging.getLogger("segjax").removeHandler(self._file_handler)
            self._file_handler.close()
