"""layers.conv2d's faster paths (1×1 as a matrix product, depthwise as shifted multiply-adds)
against lax.conv_general_dilated: outputs and both gradients, the cases that fall back too."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from segjax.models.layers import Conv, ConvNormAct


@pytest.mark.parametrize("features, kernel, strides, dilation, groups, padding, fast", [
    ((6, 10), 1, 1, 1, 1, 0, True),     # pointwise: einsum
    ((6, 10), 1, 1, 1, 1, "SAME", True),
    ((6, 6), 3, 1, 1, 6, 1, True),      # depthwise: shifted multiply-adds
    ((6, 6), 3, 2, 1, 6, 1, True),
    ((6, 6), 3, 1, 4, 6, 4, True),      # Fast-SCNN's fusion: dilation 4
    ((6, 6), 5, 2, 1, 6, 2, True),
    ((6, 10), 1, 2, 1, 1, 0, False),    # strided 1×1
    ((6, 12), 3, 1, 1, 6, 1, False),    # grouped, not depthwise
    ((6, 6), 3, 1, 1, 1, 1, False),     # dense 3×3
])
def test_conv_matches_lax(features, kernel, strides, dilation, groups, padding, fast):
    conv = Conv(*features, (kernel, kernel), strides, padding=padding, kernel_dilation=dilation,
                feature_group_count=groups, rngs=nnx.Rngs(0))
    reference = nnx.clone(conv)
    reference.conv_general_dilated = lax.conv_general_dilated
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 11, 9, features[0]), np.float32))

    def loss(module, x):
        return (module(x) ** 2).sum()

    assert ("conv_general_dilated" in str(jax.make_jaxpr(conv)(x))) != fast
    np.testing.assert_allclose(conv(x), reference(x), rtol=1e-5, atol=1e-5)
    ours = nnx.grad(loss, argnums=(0, 1))(conv, x)
    theirs = nnx.grad(loss, argnums=(0, 1))(reference, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_conv_norm_act_uses_the_fast_conv_in_bfloat16():
    block = ConvNormAct(8, 8, 3, 2, groups=8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = block(jnp.ones((1, 8, 8, 8)))
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 4, 4, 8)
    assert block.conv.kernel[...].dtype == jnp.float32
