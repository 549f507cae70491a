"""The stack segjax pins: jax-ml/jax#39103, a CPU miscompilation in jaxlib 0.10.2 that segjax's
pin then reproduced (a vmapped 3x3 matrix-vector product squared and summed per row: 1071645696.0
under jit against 1073741824.0 eagerly), must stay fixed."""
import jax
import jax.numpy as jnp
import numpy as np


def test_vmapped_matvec_sum_is_compiled_correctly():
    matrix = jnp.eye(3, dtype=jnp.float32)

    def squared_norms(x):
        return jax.vmap(lambda row: jnp.sum((matrix @ row) ** 2))(x)

    rows = jnp.arange(32_769, dtype=jnp.float32)
    x = jnp.stack((rows, jnp.zeros_like(rows), jnp.zeros_like(rows)), axis=1)
    expected = np.float32(32_768.0) ** 2  # exactly 1073741824 in float32
    assert float(squared_norms(x)[-1]) == expected
    # conftest turns most XLA optimisations off; the bug is in the optimised program.
    optimised = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        assert float(jax.jit(squared_norms)(x)[-1]) == expected
    finally:
        jax.config.update("jax_disable_most_optimizations", optimised)
