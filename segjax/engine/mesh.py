"""Device mesh, multi-host start-up and moving host batches onto the mesh."""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from segjax.config import ConfigError

log = logging.getLogger(__name__)

# Environment variables by which jax.distributed.initialize() recognises a cluster launch.
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, heartbeat_timeout: int = 100) -> None:
    """Joins a multi-process run: explicit arguments, else JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID, else auto-detected (SLURM, Open MPI, TPU pods).

    A process that dies or stalls stops sending heartbeats; after `heartbeat_timeout` seconds the
    coordination service fails the others (instead of leaving them blocked in a collective).
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout, initialization_timeout=max(heartbeat_timeout, 60))
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, **timeouts)
    elif any(int(os.environ.get(k, "1") or 1) > 1 if k.endswith(("NTASKS", "SIZE")) else k in os.environ
             for k in _CLUSTER_ENV):
        jax.distributed.initialize(**timeouts)
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; `model` holds copies of it


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1) -> jax.sharding.Mesh:
    """An Auto-axes mesh (data, fsdp, model) over every device of every process; -1 = the rest.

    `jax.make_mesh` puts the last axes on the closest devices: `model`, then `fsdp`, stay inside
    a node when their sizes allow, and `data` spans nodes.
    """
    sizes = [data, fsdp, model]
    known = np.prod([s for s in sizes if s != -1])
    if -1 in sizes:
        if jax.device_count() % known:
            raise ConfigError(f"mesh sizes {dict(zip(AXES, sizes))} do not divide the {jax.device_count()} devices")
        sizes[sizes.index(-1)] = jax.device_count() // int(known)
    if np.prod(sizes) != jax.device_count():
        raise ConfigError(f"mesh sizes {dict(zip(AXES, sizes))} multiply to {np.prod(sizes)}, "
                         f"not the {jax.device_count()} devices (use -1 for the rest)")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def make_data_mesh() -> jax.sharding.Mesh:
    """Every device on `data`: evaluation and prediction, which keep the weights replicated."""
    return make_mesh()


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> int:
    """The per-process batch; the global batch must split evenly over the batch axes and processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards or global_batch % jax.process_count():
        raise ConfigError(f"batch size {global_batch} must be a multiple of mesh data x fsdp = {shards} "
                         f"and of the {jax.process_count()} processes")
    return global_batch // jax.process_count()


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_local(tree, mesh: jax.sharding.Mesh):
    """This process's rows of batch-sharded outputs, as numpy (for drawing and logging)."""
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.global_array_to_host_local_array(tree, mesh, P(BATCH_AXES)))


def to_global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Each process's slice of the batch becomes one global array split over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
