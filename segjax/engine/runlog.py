"""A run directory's logs: train.log, metrics.jsonl, TensorBoard scalars. Process 0 writes."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import jax
from tqdm import tqdm

log = logging.getLogger("segjax")


class _Console(logging.Handler):
    """Writes to whatever sys.stderr is when it logs (callers such as tests swap it), through
    tqdm.write: an open progress bar is cleared first and redrawn below, so a log line never
    lands on the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # as logging.StreamHandler does: a broken stream is no crash
            self.handleError(record)


def setup_console_logging(level: int = logging.INFO, *, verbose: bool | None = None) -> None:
    """segjax's log lines on the console. Third-party chatter (orbax's absl warnings about read-only
    checkpoint directories) is shown with `verbose` only (None: as an earlier call set it, else
    hidden); see also `quiet_onnxruntime`."""
    if not log.handlers:
        handler = _Console()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False
    absl = logging.getLogger("absl")
    if verbose is not None or absl.level == logging.NOTSET:
        absl.setLevel(logging.INFO if verbose else logging.ERROR)


def quiet_onnxruntime(verbose: bool = False) -> None:
    """onnxruntime's default log severity, for the sessions created after: warnings (2) with
    `verbose`, else errors only (3) (e.g. no "Removing initializer" lines on a Mask2Former export)."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(2 if verbose else 3)


def json_safe(value):
    """`value` with every NaN/inf float as None (null): strict JSON, which other tools parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def per_class_iou(columns: list[tuple[str, dict]]) -> list[str]:
    """A console table of every class's IoU (the `iou_<class>` metrics): a row per class, a column
    per (title, metrics); a class in neither target nor prediction (NaN) is "absent"."""
    keys = [k for k in columns[0][1] if k.startswith("iou_")]
    if not keys:
        return []
    width = max(len("IoU per class"), *(len(k) - 4 for k in keys))
    lines = [f"{'IoU per class':<{width}} " + " ".join(f"{title:>10}" for title, _ in columns)]
    for key in keys:
        cells = (f"{m[key]:10.4f}" if isinstance(m.get(key), float) and math.isfinite(m[key]) else f"{'absent':>10}"
                 for _, m in columns)
        lines.append(f"{key[4:]:<{width}} " + " ".join(cells))
    return lines


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
