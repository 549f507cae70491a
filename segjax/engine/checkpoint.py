"""orbax checkpoints: model, optimizer, data-iterator state and JSON metadata in one step directory.

The latest checkpoint and the best one (by the task's metric) are both kept. orbax writes to a
temporary directory and renames it when complete, so a save killed midway is never restored.
"""
from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def _abstract(tree):
    """Restore targets carrying the live shardings, so restoring works on any device count."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, directory: str | Path, *, best_metric: str = "miou", best_mode: str = "max",
                 read_only: bool = False):
        metric_fn = lambda metrics: metrics[best_metric]  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            best_fn=metric_fn,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=False,
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=1),
                policies.BestN(get_metric_fn=metric_fn, reverse=best_mode == "min", n=1,
                               keep_checkpoints_without_metrics=False),
            ]),
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, model_state, opt_state, data_iter, meta: dict, metrics: dict | None) -> None:
        """Asynchronous; `metrics` None marks a checkpoint that takes no part in the best ranking."""
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model_state),
            optimizer=ocp.args.StandardSave(opt_state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, model_state, opt_state=None, data_iter=None):
        """Restores into the structure and shardings of the given live states; None parts are skipped."""
        items = {"model": ocp.args.StandardRestore(_abstract(model_state)), "meta": ocp.args.JsonRestore()}
        if opt_state is not None:
            items["optimizer"] = ocp.args.StandardRestore(_abstract(opt_state))
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["model"], restored.get("optimizer") if opt_state is not None else None, restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def find_checkpoint_dir(path: str | Path) -> tuple[Path, int | None]:
    """Accepts a run directory, its `checkpoints/` directory or one step directory inside it."""
    path = Path(path).absolute()
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and path.parent.is_dir():
        return path.parent, int(path.name)
    if path.is_dir():
        return path, None
    raise FileNotFoundError(f"no checkpoint at {path} (give a run directory, its checkpoints/ or a step directory)")
