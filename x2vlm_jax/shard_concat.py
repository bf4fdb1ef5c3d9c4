"""Concatenation along a sharded batch axis that keeps every row on the device that holds it.

The train step runs the images of all kinds through ONE vision-tower call, all texts through ONE
text-tower call and all fusion passes through ONE fusion call (fewer traced tower copies: a
third of the compile time). A plain `jnp.concatenate` of arrays whose batch axis is split over
`s` shards would make XLA move rows between devices, because row i of the result no longer lives
where row i of its piece lived. `cat` instead concatenates shard by shard:

  piece k [n_k, ...] -> [s, n_k / s, ...];  concatenate on axis 1;  -> [sum n_k, ...]

so shard j of the result is [shard j of piece 0, shard j of piece 1, ...] and the reshapes are
free. `split` is the exact inverse, `index` maps a row number of a piece to its row in the result.
With s = 1 all three are the ordinary concatenate / split / offset.

Row order inside a tower call does not matter (every tower is row-wise), so this changes where
rows sit, never what they compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from x2vlm_jax import sharding
from x2vlm_jax.models.layers import constrain


def num_shards(mesh: Mesh | None, sizes: Sequence[int]) -> int:
  """Shards of the batch axis if they divide every size, else 1."""
  s = sharding.batch_shards(mesh)
  return s if all(n % s == 0 for n in sizes) else 1


def _batch(x: jax.Array, axis: int) -> jax.Array:
  """Pins `axis` of x to the batch sharding (a no-op without an ambient mesh): tells XLA the
  layout that makes the reshapes free, instead of letting it guess one that moves data."""
  return constrain(x, tuple("batch" if i == axis else None for i in range(x.ndim)))


def cat(xs: Sequence[jax.Array], shards: int, axis: int = 0) -> jax.Array:
  """Shard-by-shard concatenation of `xs` along `axis` (see the module docstring)."""
  if shards == 1:
    return jnp.concatenate(xs, axis)
  parts = [
    _batch(
      x.reshape(x.shape[:axis] + (shards, x.shape[axis] // shards) + x.shape[axis + 1 :]), axis
    )
    for x in xs
  ]
  y = jnp.concatenate(parts, axis + 1)  # [..., s, sum n_k / s, ...]
  return _batch(y.reshape(y.shape[:axis] + (-1,) + y.shape[axis + 2 :]), axis)


def split(y: jax.Array, sizes: Sequence[int], shards: int, axis: int = 0) -> list[jax.Array]:
  """Inverse of `cat`: the pieces of sizes `sizes` along `axis`."""
  bounds = [sum(sizes[:i]) // shards for i in range(1, len(sizes))]
  if shards == 1:
    return jnp.split(y, bounds, axis)
  y = _batch(y.reshape(y.shape[:axis] + (shards, -1) + y.shape[axis + 1 :]), axis)
  return [
    _batch(p.reshape(p.shape[:axis] + (-1,) + p.shape[axis + 2 :]), axis)
    for p in jnp.split(y, bounds, axis + 1)
  ]


def index(rows: jax.Array, piece: int, sizes: Sequence[int], shards: int) -> jax.Array:
  """Row numbers within piece `piece` -> row numbers within `cat` of pieces of `sizes`."""
  local = [n // shards for n in sizes]
  offset = sum(local[:piece])
  shard, j = jnp.divmod(rows, local[piece])
  return (shard * sum(local) + offset + j).astype(rows.dtype)
