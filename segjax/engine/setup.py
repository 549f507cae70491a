"""The model set-up every entry point shares: the task's model and optimizer as split NNX state,
weights from a PyTorch state dict or a checkpoint, and a checkpoint's own config and model."""
from __future__ import annotations

import logging
import typing
from collections.abc import Sequence
from pathlib import Path

import jax
import optax
from flax import nnx

from segjax import config as config_lib
from segjax import tasks
from segjax.engine import optim as optim_lib
from segjax.engine import remat as remat_lib
from segjax.engine import sharding as sharding_lib
from segjax.engine.checkpoint import Checkpointer, find_checkpoint_dir, latest_run

log = logging.getLogger("segjax")


class ModelSetup(typing.NamedTuple):
    model_def: nnx.GraphDef  # training mode
    eval_def: nnx.GraphDef  # BatchNorm running averages, dropout off
    opt_def: nnx.GraphDef
    model_state: nnx.State
    opt_state: nnx.State
    shardings: tuple  # of (model_state, opt_state)
    schedule: typing.Callable  # learning rate per optimizer update
    num_params: int
    num_trained: int  # parameters the optimizer updates (task.trainable)


def build_state(task, mesh: jax.sharding.Mesh, steps_per_epoch: int, epochs: int) -> ModelSetup:
    """The task's model and optimizer as split NNX state, created sharded by `cfg.mesh` (with the
    modules `cfg.train.remat` names rematerialised)."""
    cfg = task.cfg
    tx, schedule = optim_lib.make_optimizer(cfg.optim, steps_per_epoch, epochs)

    def create():
        model = task.build_model(nnx.Rngs(cfg.train.seed))
        remat_lib.apply(model, cfg.train.remat)
        return model, nnx.Optimizer(model, tx, wrt=task.trainable)  # state for the trained parameters only

    model_def, eval_def, opt_def, model_state, opt_state, shardings = sharding_lib.create_sharded(
        create, mesh, sharding_lib.parse_rules(cfg.mesh.sharding), cfg.mesh.min_shard_bytes)
    model = nnx.merge(model_def, model_state)
    num_params, num_trained = (sum(x.size for x in jax.tree.leaves(nnx.state(model, which)))
                               for which in (nnx.Param, task.trainable))
    optim_lib.log_groups(cfg.optim.param_groups, nnx.state(model, task.trainable))
    return ModelSetup(model_def, eval_def, opt_def, model_state, opt_state, shardings, schedule, num_params,
                      num_trained)


def load_torch_weights(task, model: nnx.Module, path: str, state_dict: dict | None = None) -> None:
    """Imports a PyTorch state dict (read from `path` unless given) into `model` in place, by the
    task's scheme (segjax.bridge)."""
    from segjax import bridge  # torch is imported only when a .pt/.pth file is read

    scheme, submodule = task.torch_weights()
    state_dict = bridge.load_torch_state_dict(path) if state_dict is None else state_dict
    bridge.import_torch_weights(getattr(model, submodule) if submodule else model, state_dict, scheme)
    log.info("initialised %s from PyTorch weights %s (scheme %s)", submodule or "the model", path, scheme)


def torch_model(task, path: str) -> tuple[object, nnx.Module]:
    """(task, model) holding a PyTorch state dict's weights; a whole-model state dict's classifier
    sets the class count (`task.with_num_classes`)."""
    from segjax import bridge

    scheme, _ = task.torch_weights()
    state_dict = bridge.load_torch_state_dict(path)
    num_classes = bridge.SCHEMES[scheme].num_classes(state_dict)
    if num_classes is not None and num_classes != len(task.class_names):
        log.info("the state dict's classifier has %d classes (the config %d): building the model for %d",
                 num_classes, len(task.class_names), num_classes)
        task = task.with_num_classes(num_classes)
    model = nnx.jit(lambda: task.build_model(nnx.Rngs(0)))()
    load_torch_weights(task, model, path, state_dict)
    return task, model


def open_checkpoint(path: str | Path, *, best: bool = True) -> tuple[Checkpointer, int]:
    """A read-only Checkpointer and its step: the one `path` names, else the best (with `best`) or
    latest complete one."""
    ckpt_dir, step = find_checkpoint_dir(path)
    checkpointer = Checkpointer(ckpt_dir, read_only=True)
    if step is None:
        step = (best and checkpointer.best_step()) or checkpointer.latest_step()
    if step is None:
        checkpointer.close()
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
    return checkpointer, step


def checkpoint_config(path: str | Path, *, best: bool = True) -> tuple[config_lib.Config, Path, int]:
    """The config saved with a checkpoint, its directory and step (see `open_checkpoint`)."""
    checkpointer, step = open_checkpoint(path, best=best)
    try:
        return config_lib.from_dict(checkpointer.meta(step)["config"]), checkpointer.directory, step
    finally:
        checkpointer.close()


def init_weights(task, model_def: nnx.GraphDef, model_state: nnx.State, sharding) -> nnx.State:
    """`train.init_from`: a PyTorch state dict (`torch:PATH`), a Hugging Face `save_pretrained`
    directory (`hf:DIR`, read by the task) or a segjax run/checkpoint (`latest` = this
    experiment's newest run) as the starting weights, placed by `sharding`."""
    cfg = task.cfg
    if cfg.train.init_from.startswith(("torch:", "hf:")):
        model = nnx.merge(model_def, model_state)
        kind, _, path = cfg.train.init_from.partition(":")
        if kind == "torch":
            load_torch_weights(task, model, path)
        else:
            task.load_hf_weights(model, path)
        return jax.device_put(nnx.state(model), sharding)
    source = cfg.train.init_from.removeprefix("segjax:")
    if source == "latest":
        source = latest_run(cfg.train.run_root, cfg.experiment)
    checkpointer, step = open_checkpoint(source)
    saved = config_lib.from_dict(checkpointer.meta(step)["config"])
    ema_task = tasks.build(tasks.resolve(saved)) if saved.optim.ema_decay else None
    model_state, _ = checkpoint_weights(checkpointer, step, model_state, ema_task)
    checkpointer.close()
    log.info("initialised weights from %s step %d", checkpointer.directory, step)
    return model_state


def checkpoint_weights(checkpointer: Checkpointer, step: int, model_state: nnx.State,
                       ema_task=None) -> tuple[nnx.State, dict]:
    """A checkpoint's weights, restored into `model_state`'s structure and shardings (abstract or
    live), and its meta. `ema_task`: the task of a checkpoint that averaged its weights
    (optim.ema_decay > 0), built from its config: its trained parameters are then their EMA (as
    mmengine's EMAHook saves the averaged model as the state dict), read alone from the optimizer state."""
    if ema_task is None:
        model_state, _, meta = checkpointer.restore(step, model_state)
        return model_state, meta
    optim_cfg = ema_task.cfg.optim
    # The state's structure only: any schedule of the same kind does (a callable one, as in training).
    tx = optim_lib.transformation(optim_cfg, optax.constant_schedule(optim_cfg.lr))
    optimizer = nnx.eval_shape(lambda: nnx.Optimizer(ema_task.build_model(nnx.Rngs(0)), tx, wrt=ema_task.trainable))
    target = optim_lib.ema_target(nnx.state(optimizer), model_state)
    model_state, ema, meta = checkpointer.restore(step, model_state, target, partial=True)
    log.info("weights: the exponential moving average (optim.ema_decay=%g) of step %d", optim_cfg.ema_decay, step)
    return optim_lib.ema_weights(model_state, ema), meta


class Restored(typing.NamedTuple):
    task: object  # built from the config saved in the checkpoint
    graphdef: nnx.GraphDef  # eval mode: BatchNorm running averages, dropout off
    state: nnx.State
    ckpt_dir: Path
    step: int
    meta: dict


def locate(path: str | Path, experiment: str | None = None, model_name: str | None = None) -> Path:
    """The step directory a checkpoint path means (`find_checkpoint_dir`: a run, checkpoint or step
    directory, a folder of runs, "latest"; the best step unless one is named); with `model_name`,
    the checkpoint must be of that model.name."""
    ckpt_dir, step = find_checkpoint_dir(path, experiment, model_name)
    cfg, ckpt_dir, step = checkpoint_config(ckpt_dir if step is None else ckpt_dir / str(step))
    name = getattr(cfg.model, "name", None)
    if model_name is not None and name != model_name:
        raise config_lib.ConfigError(f"{path} is a checkpoint of model {name!r}, not {model_name!r}")
    return ckpt_dir / str(step)


def restore_model(path: str | Path, *, overrides: Sequence[str] = (), sharding=None) -> Restored:
    """A checkpoint's model (its best step, else its latest) with the task its saved config builds.

    `overrides` are `key=value` config changes; `sharding` places the weights (default: the
    first local device). Reads no data: the task opens them only when asked.
    """
    cfg, ckpt_dir, step = checkpoint_config(path)
    task = tasks.build(tasks.resolve(config_lib.apply(cfg, config_lib.parse_set(overrides))))
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))  # shapes only: weights come from the checkpoint
    model.eval()
    graphdef, abstract_state = nnx.split(model)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state)
    checkpointer = Checkpointer(ckpt_dir, read_only=True)
    state, meta = checkpoint_weights(checkpointer, step, abstract_state, task if task.cfg.optim.ema_decay else None)
    checkpointer.close()
    return Restored(task, graphdef, state, ckpt_dir, step, meta)
