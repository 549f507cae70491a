"""Device mesh, multi-host start-up and moving host batches onto the mesh."""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

# Environment variables by which jax.distributed.initialize() recognises a cluster launch.
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-process run: explicit flags, or auto-detected (SLURM, Open MPI, TPU pods)."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif any(int(os.environ.get(k, "1") or 1) > 1 if k.endswith(("NTASKS", "SIZE")) else k in os.environ
             for k in _CLUSTER_ENV):
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def make_data_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process; the batch is split along `data`."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> int:
    """The per-process batch; the global batch must split evenly over devices."""
    devices = mesh.devices.size
    if global_batch % devices:
        raise ValueError(f"batch size {global_batch} must be a multiple of the device count {devices}")
    return global_batch // jax.process_count()


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_local(tree, mesh: jax.sharding.Mesh):
    """This process's rows of batch-sharded outputs, as numpy (for drawing and logging)."""
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.global_array_to_host_local_array(tree, mesh, P("data")))


def to_global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Each process's slice of the batch becomes one global array split over `data`."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
