"""Minimum-cost bipartite matching (Hungarian algorithm) of queries to padded targets.

One signature, two implementations chosen by `method`:
  "optax"  `optax.assignment.hungarian_algorithm`, pure JAX: runs inside `jit` on any device
           with no host round trip; vmapped over leading batch axes.
  "scipy"  `scipy.optimize.linear_sum_assignment` on the host through `jax.pure_callback`:
           exact and fast for large matrices on CPU, but every call syncs with the host.
Both return the same optimal assignment for costs without ties.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

METHODS = ("optax", "scipy")


def _prepare(cost: jax.Array, target_valid: jax.Array | None) -> jax.Array:
    """Costs of invalid targets (and non-finite costs) become one more than the largest finite
    valid cost: any assignment then prefers a valid target, which leaves the optimal matching of
    the valid targets unchanged, and the value stays small enough not to swamp float32 in the
    algorithm's potentials (a huge constant would)."""
    cost = cost.astype(jnp.float32)
    usable = jnp.isfinite(cost)
    if target_valid is not None:
        usable &= target_valid[..., None, :].astype(bool)
    high = jnp.max(jnp.where(usable, cost, -jnp.inf), axis=(-2, -1), keepdims=True)
    high = jnp.where(jnp.isfinite(high), high, 0.0)
    return jnp.where(usable, cost, high + 1.0)


def _optax_match(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    match = optax.assignment.hungarian_algorithm
    for _ in range(cost.ndim - 2):
        match = jax.vmap(match)
    rows, cols = match(cost)
    return rows.astype(jnp.int32), cols.astype(jnp.int32)


def _scipy_match_host(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment  # slow to import; only this path needs it
    *batch, q, t = cost.shape
    flat = cost.reshape(-1, q, t)
    pairs = [linear_sum_assignment(c) for c in flat]
    rows = np.stack([r for r, _ in pairs]).astype(np.int32)
    cols = np.stack([c for _, c in pairs]).astype(np.int32)
    return rows.reshape(*batch, -1), cols.reshape(*batch, -1)


def _scipy_match(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    k = min(cost.shape[-2:])
    out = jax.ShapeDtypeStruct((*cost.shape[:-2], k), jnp.int32)
    # The host function takes any leading axes, so under vmap it gets the whole batch at once.
    return jax.pure_callback(_scipy_match_host, (out, out), cost, vmap_method="expand_dims")


def hungarian_match(
    cost: jax.Array,
    target_valid: jax.Array | None = None,
    *,
    method: str = "optax",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Minimum-cost one-to-one assignment of queries (rows) to targets (columns).

    cost: [..., Q, T] matching costs; leading axes are independent problems (a batch).
    target_valid: [..., T] bool, False for padding targets; None means all are valid.
    Returns (row_idx, col_idx, valid), each [..., K] with K = min(Q, T): query row_idx[k] is
    assigned target col_idx[k]. Exactly min(Q, T) pairs are returned whatever the padding;
    `valid[k]` is False where the target is padding (the pair must be ignored). With Q >= T
    every valid target is matched. Pair order is unspecified. No gradient flows through.
    """
    if method not in METHODS:
        raise ValueError(f"unknown matching method {method!r}; choose one of {METHODS}")
    if cost.ndim < 2:
        raise ValueError(f"cost must be [..., Q, T], got shape {cost.shape}")
    cost = _prepare(jax.lax.stop_gradient(cost), target_valid)
    rows, cols = (_optax_match if method == "optax" else _scipy_match)(cost)
    if target_valid is None:
        valid = jnp.ones(rows.shape, bool)
    else:
        valid = jnp.take_along_axis(target_valid.astype(bool), cols, axis=-1)
    return rows, cols, valid
