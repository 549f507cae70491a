"""orbax checkpoints: model, optimizer and JSON metadata (config, epoch, step) in one step directory.

The latest checkpoint and the best one (by the task's metric) are both kept. orbax writes to a
temporary directory and renames it when complete, so a save killed midway is never restored.
The data position is not stored: the training stream is rebuilt from the step (data/pipeline.py),
which also works on another number of processes. Restores take their shardings from the live
(current mesh) state, so a checkpoint written on N devices loads on M.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from segjax.config import ConfigError
from segjax.errors import CheckpointError


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

    def save(self, step: int, model_state, opt_state, meta: dict, metrics: dict | None) -> None:
        """Asynchronous; `metrics` None marks a checkpoint that takes no part in the best ranking."""
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model_state),
            optimizer=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def meta(self, step: int) -> dict:
        return self._restore(step, {"meta": ocp.args.JsonRestore()})["meta"]

    def restore(self, step: int, model_state, opt_state=None, *, partial: bool = False):
        """Restores into the structure and shardings of the given states (live or abstract); None
        parts are skipped. `partial`: `opt_state` is a part of the saved optimizer state (the EMA)."""
        items = {"model": ocp.args.StandardRestore(_abstract(model_state)), "meta": ocp.args.JsonRestore()}
        if opt_state is not None and partial:
            target = _abstract(opt_state)
            items["optimizer"] = ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)
        elif opt_state is not None:
            items["optimizer"] = ocp.args.StandardRestore(_abstract(opt_state))
        restored = self._restore(step, items)
        return restored["model"], restored.get("optimizer") if opt_state is not None else None, restored["meta"]

    def _restore(self, step: int, items: dict) -> dict:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(self._damaged(step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")) from e
        if "meta" in items and not isinstance(restored.get("meta"), dict):
            raise CheckpointError(self._damaged(step, "its metadata (meta) is missing"))
        return restored

    def _damaged(self, step: int, why: str) -> str:
        earlier = [s for s in self.manager.all_steps() if s < step]
        hint = (f"move {self.directory / str(step)} aside and resume from the latest complete step"
                f" (earlier steps: {earlier}), or give one: --resume {self.directory / str(max(earlier))}"
                if earlier else "no earlier step to fall back to")
        return f"checkpoint step {step} in {self.directory} cannot be read ({why}); {hint}"

    def check_no_later_steps(self, step: int) -> None:
        """Resuming from an earlier step would overwrite the later ones: refuse while they exist."""
        later = [s for s in self.manager.all_steps() if s > step]
        if later:
            raise CheckpointError(f"--resume from step {step}: {self.directory} also holds later steps {later}; "
                                  f"move them aside first (training on would overwrite them)")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def checkpoint_subdir(run_dir: Path) -> str:
    """The checkpoint directory's name recorded in a run's config.json (default `checkpoints`)."""
    try:
        return json.loads((run_dir / "config.json").read_text())["train"]["checkpoint_subdir"]
    except (OSError, ValueError, KeyError):
        return "checkpoints"


def find_checkpoint_dir(path: str | Path, experiment: str | None = None,
                        model_name: str | None = None) -> tuple[Path, int | None]:
    """Where a checkpoint path points, the one resolver of every entry point: (checkpoint
    directory, step or None). `path` is a run directory, its checkpoint directory, one step
    directory, a folder holding runs (e.g. runs/ or runs/roadways_mask2former: its newest run of
    `experiment`, of `model_name` when given) or "latest" (the newest run under ./runs)."""
    if str(path) == "latest":
        path = latest_run("runs", experiment, model_name)
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (path / checkpoint_subdir(path)).is_dir():
        return path / checkpoint_subdir(path), None
    if path.name.isdigit() and path.is_dir():
        return path.parent, int(path.name)
    if path.is_dir() and any(p.name.isdigit() and p.is_dir() for p in path.iterdir()):
        return path, None
    if path.is_dir():  # a folder of runs
        run_dir = latest_run(path, experiment, model_name)
        return run_dir / checkpoint_subdir(run_dir), None
    raise FileNotFoundError(f"no checkpoint at {path} (give a run directory, its checkpoint directory, a step "
                            f"or a folder of runs)")


def latest_run(run_root: str | Path, experiment: str | None = None, model_name: str | None = None) -> Path:
    """The newest run directory of `experiment` (None: of any, if only one is found) under
    `run_root` that holds a complete checkpoint; with `model_name`, only runs whose `model.name` is
    that (experiments training several models)."""
    runs, models_seen, experiments = [], set(), set()
    for config_file in Path(run_root).glob("**/config.json"):
        run_dir = config_file.parent
        try:
            saved = json.loads(config_file.read_text())
        except (OSError, ValueError):
            continue
        if experiment not in (None, saved.get("experiment")):
            continue
        name = saved.get("model", {}).get("name")
        models_seen.add(str(name))
        ckpt_dir = run_dir / checkpoint_subdir(run_dir)
        if (model_name in (None, name) and ckpt_dir.is_dir()
                and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
            runs.append(run_dir)
            experiments.add(str(saved.get("experiment")))
    if not runs:
        which = f"{experiment!r}" if experiment else "any experiment"
        which += f" with model {model_name!r}" if model_name else ""
        seen = f" (models found: {sorted(models_seen) or 'none'})" if model_name else ""
        raise FileNotFoundError(f"no run of {which} with checkpoints under {Path(run_root).absolute()}{seen}")
    if len(experiments) > 1:
        raise ConfigError(f"{Path(run_root).absolute()} holds runs of several experiments "
                          f"({', '.join(sorted(experiments))}): name one with --experiment, or give a run directory")
    return max(runs, key=lambda p: (p / "config.json").stat().st_mtime)
