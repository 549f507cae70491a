"""python -m segjax.train --experiment NAME: one trainer for every experiment.

Read top to bottom: command line -> config -> task -> mesh -> data -> model and optimizer ->
checkpoint/resume -> steps -> epochs (train, validate, visualise, save).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from segjax import cli, tasks
from segjax import config as config_lib
from segjax.data import pipeline
from segjax.data.errors import DataError
from segjax.engine import mesh as mesh_lib
from segjax.engine import optim as optim_lib
from segjax.engine import preemption, setup
from segjax.engine import steps as steps_lib
from segjax.engine.checkpoint import Checkpointer, find_checkpoint_dir, latest_run
from segjax.engine.evaluation import make_evaluator, validate_model
from segjax.engine.runlog import RunLog, per_class_iou, setup_console_logging
from segjax.errors import ArgumentParser, guarded

log = logging.getLogger("segjax")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m segjax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_OR_CHECKPOINT",
                        help="continue a run exactly; no value = the latest run of this experiment")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="train these models one after the other (model.name; default: the experiment's)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings (orbax/absl, onnxruntime)")
    group = parser.add_argument_group("multi-host (see README)")
    group.add_argument("--coordinator_address", help="host:port of process 0; omit to auto-detect SLURM/MPI")
    group.add_argument("--num_processes", type=int)
    group.add_argument("--process_id", type=int)
    group.add_argument("--heartbeat_timeout", type=int, default=100, metavar="SECONDS",
                       help="a process silent this long (dead or stalled) makes the others fail")
    return parser


def resolve_config(argv: list[str], *, demo: bool = True) -> tuple[config_lib.Config, argparse.Namespace]:
    """The config a command line asks for (the resumed run's saved config with --resume), and the
    parsed arguments; see segjax.cli."""
    args = cli.parse(build_parser(), argv)
    if args.resume is None:
        return cli.experiment_config(args, demo=demo), args
    pairs = cli.overrides(args)
    base = config_lib.load_experiment(args.experiment)
    run_root = dict(pairs).get("train.run_root", base.train.run_root)
    path = latest_run(run_root, base.experiment) if args.resume == "latest" else args.resume
    ckpt_dir, named_step = find_checkpoint_dir(path, base.experiment)
    cfg, ckpt_dir, step = setup.checkpoint_config(ckpt_dir if named_step is None else ckpt_dir / str(named_step),
                                                  best=False)
    # A step named in the path stays in it: resume from that step, not from the latest.
    resume = ckpt_dir / str(step) if named_step is not None else ckpt_dir
    return cli.checked(config_lib.apply(cfg, pairs + [("train.resume", str(resume))])), args


def models_to_train(cfg: config_lib.Config, args: argparse.Namespace) -> list[config_lib.Config]:
    """One config per model of --models (default: every choice of the experiment's `model`
    variant); just `cfg` for a resumed run or an experiment of one model."""
    variants = config_lib.experiment_variants(args.experiment)
    names = args.models or list(variants.get("model", ()))
    if args.resume is not None or not names:
        return [cfg]
    if not config_lib.has_path(cfg, "model.name"):
        raise config_lib.ConfigError(f"--models: experiment {cfg.experiment!r} has no model.name to choose")
    if "model" in variants:
        return [cli.experiment_config(args, model=name) for name in names]
    return [cli.checked(config_lib.override(cfg, "model.name", name)) for name in names]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _new_run_dir(cfg: config_lib.Config, metric: str) -> Path:
    now = datetime.datetime.now()
    # Every process must write into the same directory: process 0's clock decides. (Two int32s:
    # without x64 mode JAX would truncate one int64.)
    stamp = np.array([int(now.strftime("%Y%m%d")), int(now.strftime("%H%M%S"))], np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        stamp = multihost_utils.broadcast_one_to_all(stamp)
    timestamp = f"{int(stamp[0]):08d}-{int(stamp[1]):06d}"
    name = cfg.train.run_name.format(experiment=Path(cfg.experiment).stem, model=getattr(cfg.model, "name", "model"),
                                     metric=metric, timestamp=timestamp)
    run_dir = Path(cfg.train.run_root) / name
    suffix = 1
    while run_dir.exists() and jax.process_count() == 1:
        run_dir = run_dir.with_name(f"{Path(name).name}-{suffix}")
        suffix += 1
    return run_dir.absolute()


def _log_metrics(runlog: RunLog, step: int, epoch: int, split: str, metrics: dict, shown: tuple[str, ...]) -> None:
    """The task's shown metrics (and lr) on the console; every metric into the run log."""
    text = " ".join(f"{k}={metrics[k]:.4f}" for k in (*shown, "lr") if isinstance(metrics.get(k), float))
    log.info("epoch %d step %d %s: %s", epoch, step, split, text)
    runlog.write(step, epoch, split, metrics)


def _check_health(totals: dict, cfg: config_lib.Config) -> None:
    bad, records = int(totals["bad_records"]), int(totals["records"])
    if records and bad / records > cfg.train.max_bad_record_ratio:
        raise RuntimeError(f"{bad} of {records} training records were unreadable, above "
                           f"train.max_bad_record_ratio={cfg.train.max_bad_record_ratio}; see train.log")
    if int(totals["nonfinite_steps"]) > cfg.train.max_nonfinite_steps:
        raise RuntimeError(f"{int(totals['nonfinite_steps'])} steps had a NaN/inf loss (skipped), above "
                           f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}; lower the lr or check the data")


def train_and_evaluate(cfg: config_lib.Config, *, stop_after_epoch: int | None = None) -> dict:
    """Trains and validates as `cfg` says; returns a summary (run dir, first and last metrics).

    `stop_after_epoch` ends the run early as a crash would (tests use it to check resume).
    """
    setup_console_logging()

    # --- Task, mesh, data, run directory -------------------------------------------------------
    cfg = tasks.resolve(cfg)  # data paths (demo data written if none were given), values found in the data
    task = tasks.build(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.model)
    local_batch = mesh_lib.check_batch_size(cfg.train.batch_size, mesh)
    train_source, train_transform = task.train_data()
    resume_dir, resume_step = find_checkpoint_dir(cfg.train.resume) if cfg.train.resume else (None, None)
    run_dir = resume_dir.parent if resume_dir and not cfg.train.test_only else _new_run_dir(cfg, task.best_metric)
    runlog = RunLog(run_dir)
    if runlog.enabled:
        config_lib.save(cfg, run_dir / "config.json")
    log.info("run directory %s; %d device(s), %d process(es)", run_dir, jax.device_count(), jax.process_count())
    steps_per_epoch = len(train_source) // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_source)} training records is less than one batch of {cfg.train.batch_size}")

    # --- Model and optimizer (sharded over the mesh by `cfg.mesh`) ---------------------------------
    start_epoch, step, meta = 0, 0, {}
    total_epochs = cfg.train.epochs
    checkpointer = Checkpointer(run_dir / cfg.train.checkpoint_subdir if not resume_dir else resume_dir,
                                best_metric=task.best_metric, best_mode=task.best_mode,
                                read_only=cfg.train.test_only)
    if resume_dir and resume_step is None:
        resume_step = checkpointer.latest_step()
    elif resume_dir and not cfg.train.test_only:
        checkpointer.check_no_later_steps(resume_step)
    if resume_dir and cfg.train.resume_epochs:
        total_epochs = checkpointer.meta(resume_step)["epoch"] + cfg.train.resume_epochs
    state = setup.build_state(task, mesh, steps_per_epoch, total_epochs)
    model_state, opt_state, schedule = state.model_state, state.opt_state, state.schedule
    log.info("model: %s parameters (%s trained), compute %s", f"{state.num_params:,}", f"{state.num_trained:,}",
             cfg.train.precision)

    # --- Resume or initialise from a checkpoint ------------------------------------------------------
    if resume_dir:  # the optimizer too under test_only: its EMA and update count
        model_state, opt_state, meta = checkpointer.restore(resume_step, model_state, opt_state)
        start_epoch, step = meta["epoch"], meta["step"]
        log.info("resumed from %s step %d (epoch %d done)", resume_dir, resume_step, start_epoch)
    elif cfg.train.init_from:
        model_state = setup.init_weights(task, state.model_def, model_state, state.shardings[0])
        if cfg.optim.ema_decay:
            opt_state = optim_lib.restart_ema(opt_state, model_state)
    # The training stream's position is the step alone, on any number of processes.
    train_iter = iter(pipeline.train_dataset(train_source, train_transform, local_batch=local_batch,
                                             seed=cfg.train.seed, num_workers=cfg.train.num_workers, start_step=step))

    # --- Steps -------------------------------------------------------------------------------------
    train_step = steps_lib.make_train_step(state.model_def, state.opt_def, task.loss_and_sums, state.shardings,
                                           cfg.train.seed, wrt=task.trainable)
    evaluator = make_evaluator(task, state.eval_def, mesh, cfg)
    vis_dir = run_dir / "visualizations"

    def validate(epoch: int) -> dict:
        def draw(batch, outputs):
            if runlog.enabled and cfg.train.num_visualizations:
                task.visualize(batch, outputs, vis_dir, f"epoch{epoch:03d}", cfg.train.num_visualizations)

        weights = optim_lib.ema_weights(model_state, opt_state) if cfg.optim.ema_decay else model_state
        metrics = validate_model(evaluator, weights, on_first_batch=draw)
        metrics["lr"] = current_lr()  # the rate the validated weights were last updated with
        _log_metrics(runlog, step, epoch, "val", metrics, task.shown_metrics)
        return metrics

    def current_lr() -> float:
        """The rate of the last update: the optimizer counts micro-batches (not skipped NaN steps)."""
        micro_steps = int(jax.device_get(opt_state["step"].get_value()))
        return float(schedule(max(micro_steps // cfg.optim.gradient_accumulation - 1, 0)))

    summary = {"run_dir": str(run_dir), "first_val": None, "last_val": None, "epochs": total_epochs,
               "shown_metrics": task.shown_metrics}
    if cfg.train.test_only:
        summary["first_val"] = summary["last_val"] = validate(start_epoch)
        summary["model_state"] = model_state
        runlog.close()
        checkpointer.close()
        return summary
    if cfg.train.eval_at_start and start_epoch == 0:
        summary["first_val"] = validate(0)

    # --- Epochs ----------------------------------------------------------------------------------------
    health = steps_lib.HostSums()
    last_epoch = min(total_epochs, stop_after_epoch or total_epochs)
    stop = preemption.StopSignal()

    def save(epoch_done: int, train_metrics: dict | None, val_metrics: dict | None, partial=None) -> None:
        saved = {"config": config_lib.to_dict(cfg), "epoch": epoch_done, "step": step,
                 "val": val_metrics, "train": train_metrics}
        if partial is not None:  # a signal stopped the run inside an epoch: its sums so far
            saved["epoch_totals"] = partial.to_json()
        best = {task.best_metric: val_metrics[task.best_metric]} if val_metrics else None
        checkpointer.save(step, model_state, opt_state, saved, best)

    def preempted() -> preemption.Preempted:
        checkpointer.wait()
        log.warning("saved checkpoint step %d after %s; exiting with status %d", step,
                    stop.received or "a signal to another process", preemption.EXIT_PREEMPTED)
        checkpointer.close()
        runlog.close()
        return preemption.Preempted(step, str(checkpointer.directory))

    with stop:
        for epoch in range(start_epoch + 1, last_epoch + 1):
            # A checkpoint saved on a signal resumes inside its epoch, with that epoch's sums so far.
            first_step = step - (epoch - 1) * steps_per_epoch
            epoch_totals = steps_lib.HostSums.from_json(meta.get("epoch_totals") if first_step else None)
            pending = None
            started = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, initial=first_step, desc=f"epoch {epoch}/{total_epochs}",
                       dynamic_ncols=True, disable=not runlog.enabled, leave=False)
            for i in range(first_step, steps_per_epoch):
                batch = mesh_lib.to_global_batch(next(train_iter), mesh)
                model_state, opt_state, sums = train_step(model_state, opt_state, batch)
                step += 1
                if step == 1:  # one extra host sync per run, for metrics_first_iter.txt
                    first = steps_lib.HostSums()
                    first.add(sums)
                    runlog.write_text("metrics_first_iter.txt", task.summarize(first.total))
                pending = sums if pending is None else steps_lib.add_sums(pending, sums)
                if (i + 1) % cfg.train.log_every == 0 or i + 1 == steps_per_epoch:
                    interval = steps_lib.HostSums()
                    interval.add(pending)  # the only host sync of the epoch, every log_every steps
                    pending = None
                    epoch_totals.add(interval.total)
                    health.add({k: interval.total[k] for k in ("records", "bad_records", "nonfinite_steps")})
                    _check_health(health.total, cfg)
                    interval_metrics = task.summarize(interval.total)
                    # Steps are dispatched asynchronously: the bar advances by the steps this sync saw finish.
                    bar.update(i + 1 - bar.n)
                    bar.set_postfix({k: f"{interval_metrics[k]:.4f}" for k in task.shown_metrics[:2]
                                     if isinstance(interval_metrics.get(k), float)})
                    log.info("epoch %d step %d (%d/%d): %s", epoch, step, i + 1, steps_per_epoch,
                             " ".join(f"{k}={interval_metrics[k]:.4f}" for k in task.shown_metrics[:2]
                                      if isinstance(interval_metrics.get(k), float)))
                if i + 1 < steps_per_epoch and stop.stop_now(step, cfg.train.log_every):
                    if pending is not None:
                        epoch_totals.add(pending)
                    save(epoch - 1, None, None, partial=epoch_totals)
                    raise preempted()
            bar.close()
            train_metrics = task.summarize(epoch_totals.total)
            train_metrics["lr"] = current_lr()
            train_metrics["bad_records"] = int(epoch_totals.total["bad_records"])
            train_metrics["nonfinite_steps"] = int(epoch_totals.total["nonfinite_steps"])
            train_metrics["images_per_second"] = ((steps_per_epoch - first_step) * cfg.train.batch_size
                                                  / (time.perf_counter() - started))
            _log_metrics(runlog, step, epoch, "train", train_metrics, task.shown_metrics)

            val_metrics = None
            if epoch % cfg.train.validate_every == 0 or epoch == total_epochs:
                val_metrics = validate(epoch)
                summary["first_val"] = summary["first_val"] or val_metrics
                summary["last_val"] = val_metrics
            stopping = stop.agree()
            if epoch % cfg.train.save_every == 0 or epoch in (total_epochs, last_epoch) or stopping:
                log.info("saving checkpoint step %d (epoch %d)", step, epoch)
                save(epoch, train_metrics, val_metrics)
            if stopping and epoch < last_epoch:
                raise preempted()
    checkpointer.wait()
    if summary["last_val"]:
        runlog.write_text("final_metrics.txt", summary["last_val"])
    summary["best_step"] = checkpointer.best_step()
    summary["steps"] = step
    summary["model_state"], summary["opt_state"] = model_state, opt_state
    checkpointer.close()
    runlog.close()
    return summary


@guarded
def main(argv: list[str] | None = None) -> int:
    setup_console_logging()
    cfg, args = resolve_config(argv)
    setup_console_logging(verbose=args.verbose)
    mesh_lib.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                    args.heartbeat_timeout)
    if args.print_config:
        print(config_lib.to_json(tasks.resolve(cfg)))
        return 0
    cli.check_data_paths(cfg)
    if cfg.demo:
        log.warning(cli.demo_notice(cfg))
    configs = models_to_train(cfg, args)
    for model_cfg in configs:
        try:
            summary = train_and_evaluate(model_cfg)
        except preemption.Preempted as e:
            print(f"preempted: {e}", file=sys.stderr)
            return preemption.EXIT_PREEMPTED
        _print_summary(summary, title=f" ({model_cfg.model.name})" if len(configs) > 1 else "")
    if cfg.demo:
        print(cli.demo_notice(cfg))
    return 0


def _print_summary(summary: dict, title: str) -> None:
    first, last = summary["first_val"], summary["last_val"]
    if last:
        keys = [k for k in summary["shown_metrics"] if isinstance(last.get(k), float) and not k.startswith("iou_")]
        print(f"\nvalidation{title}\n{'':8}" + " ".join(f"{k:>16}" for k in keys))
        if first is not last and first is not None:
            print(f"{'first':8}" + " ".join(f"{first[k]:16.4f}" for k in keys))
        print(f"{'final':8}" + " ".join(f"{last[k]:16.4f}" for k in keys))
        per_class = per_class_iou([("final", last)])
        if per_class:
            print("\n" + "\n".join(per_class))
    print(f"run directory: {summary['run_dir']}")


if __name__ == "__main__":
    sys.exit(main())
