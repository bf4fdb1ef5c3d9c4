"""layers.gelu: the exact (erf) GELU with its gradient written out (the backward pass keeps only
the input). Its values are jax.nn.gelu's and its gradient is the formula's, to float rounding,
in float32 and bfloat16, under jit and remat."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2vlm_jax.models import layers as L


def _reference(x):
  return jax.nn.gelu(x, approximate=False)


def test_values_and_gradient_match_autodiff_float32():
  x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32)
  np.testing.assert_array_equal(L.gelu(x), _reference(x))
  w = jnp.cos(x)  # a non-uniform cotangent
  ours = jax.jit(jax.grad(lambda x: (L.gelu(x) * w).sum()))(x)
  ref = jax.grad(lambda x: (_reference(x) * w).sum())(x)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=3e-7)
  remat = jax.grad(lambda x: (jax.checkpoint(L.gelu)(x) * w).sum())(x)
  np.testing.assert_allclose(remat, ours, rtol=0, atol=3e-7)


def test_bfloat16_keeps_its_dtype_and_gradient():
  x = jnp.linspace(-6.0, 6.0, 1201, dtype=jnp.bfloat16)
  y, vjp = jax.vjp(L.gelu, x)
  (g,) = vjp(jnp.ones_like(y))
  assert y.dtype == g.dtype == jnp.bfloat16
  ref = jax.grad(lambda x: _reference(x).sum())(x.astype(jnp.float32))
  np.testing.assert_allclose(g.astype(jnp.float32), ref, atol=2e-2, rtol=2e-2)


def test_gradient_of_a_layer_mlp_matches_the_formula():
  """Inside a block (Mlp: fc1 -> gelu -> fc2) the parameters' gradients are the formula's."""
  mlp = L.Mlp(
    8,
    32,
    kernel_init=jax.nn.initializers.normal(0.5),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs=nnx.Rngs(0),
  )
  x = jax.random.normal(jax.random.key(1), (3, 5, 8))

  def loss(m, act):
    old, L.gelu = L.gelu, act
    try:
      return (m(x) ** 2).sum()
    finally:
      L.gelu = old

  ours = nnx.grad(lambda m: loss(m, L.gelu))(mlp)
  ref = nnx.grad(lambda m: loss(m, _reference))(mlp)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    assert float(jnp.abs(a).max()) > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
