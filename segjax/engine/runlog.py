"""A run directory's logs: train.log, metrics.jsonl, TensorBoard scalars. Process 0 writes."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import jax

log = logging.getLogger("segjax")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when it logs (callers such as tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_console_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = _CurrentStderr()
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
            # One writer per split (tensorboard/train, tensorboard/val), so TensorBoard overlays
            # the train and val curves of each metric.
            self._writers = {}
            self._summary_writer = lambda split: SummaryWriter(str(self.run_dir / "tensorboard" / split))
            self._metrics = open(self.run_dir / "metrics.jsonl", "a")

    def write(self, step: int, epoch: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        if split not in self._writers:
            self._writers[split] = self._summary_writer(split)
        writer = self._writers[split]
        record = {"step": int(step), "epoch": int(epoch), "split": split}
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                record[name] = None if isinstance(value, float) and math.isnan(value) else value
                if record[name] is not None:
                    writer.add_scalar(name, value, step)
            else:
                record[name] = value
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        writer.flush()

    def write_text(self, name: str, metrics: dict) -> None:
        """A small human-readable metrics file in the run directory (e.g. final_metrics.txt)."""
        if self.enabled:
            lines = [f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()]
            (self.run_dir / name).write_text("\n".join(lines) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._metrics.close()
            for writer in self._writers.values():
                writer.close()
            logging.getLogger("segjax").removeHandler(self._file_handler)
            self._file_handler.close()
