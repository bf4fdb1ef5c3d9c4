"""The paper's masked-concept label assignment, solved exactly in the graph (docs/mvptr.md).

`hungarian_targets(probs, labels)` is the jnp twin of `mvptr_concepts.hungarian_targets` (the
SciPy host version, kept as the reference in tests): per example, the masked slots and the
masked concepts are matched at minimum total 1 - p(slot, concept), and the matched concept
becomes the slot's label. It runs inside the jitted step with no host callback: a callback
gathers its inputs to one device and stalled the all-gathers of a multi-device CPU run, and is
slow on TPU pods.

Solver: the O(n^3) Hungarian method with row/column potentials and shortest augmenting paths
(Kuhn-Munkres as refined by Jonker-Volgenant), over a fixed [T, T] matrix per example with
`lax.fori_loop` / `lax.while_loop`, vmapped over the batch. T is small (max_tags <= ~30,
max_phrases), so the n^3 vector steps are cheap. Slots that are not masked are padded in: a
cost of 0 between two padding slots and `T + 1` between a padding slot and a real one, which is
more than any real assignment can save (real costs lie in [0, 1]), so the optimum pairs real
with real and its real part is the optimum of the masked sub-problem. Without ties that optimum
is unique and equals SciPy's; with ties (e.g. a concept masked twice) any optimal choice is
returned (repeated concepts give the same labels whichever copy is chosen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_INF = 1e30


def solve(cost):
  """cost [n, n] float32 -> int32 [n]: the column assigned to each row at minimum total cost."""
  n = cost.shape[0]
  # 1-based rows and columns as in the textbook method; column 0 is the virtual start.
  a = jnp.pad(cost.astype(jnp.float32), ((1, 0), (1, 0)))

  def add_row(i, carry):
    u, v, p = carry
    p = p.at[0].set(i)
    state = (
      u,
      v,
      p,
      jnp.full((n + 1,), _INF),
      jnp.zeros((n + 1,), jnp.int32),
      jnp.zeros((n + 1,), bool),
      jnp.int32(0),
    )

    def grow(s):  # one Dijkstra step of the shortest augmenting path from row i
      u, v, p, minv, way, used, j0 = s
      used = used.at[j0].set(True)
      i0 = p[j0]
      cur = a[i0] - u[i0] - v
      better = (~used) & (cur < minv)
      minv = jnp.where(better, cur, minv)
      way = jnp.where(better, j0, way)
      j1 = jnp.argmin(jnp.where(used, _INF, minv)).astype(jnp.int32)
      delta = jnp.where(used, _INF, minv)[j1]
      u = u.at[p].add(jnp.where(used, delta, 0.0))  # the used columns hold distinct rows
      v = jnp.where(used, v - delta, v)
      minv = jnp.where(used, minv, minv - delta)
      return u, v, p, minv, way, used, j1

    u, v, p, _, way, _, j0 = jax.lax.while_loop(lambda s: s[2][s[6]] != 0, grow, state)

    def augment(s):
      p, j0 = s
      j1 = way[j0]
      return p.at[j0].set(p[j1]), j1

    p, _ = jax.lax.while_loop(lambda s: s[1] != 0, augment, (p, j0))
    return u, v, p

  init = (
    jnp.zeros((n + 1,), jnp.float32),
    jnp.zeros((n + 1,), jnp.float32),
    jnp.zeros((n + 1,), jnp.int32),
  )
  _, _, p = jax.lax.fori_loop(1, n + 1, add_row, init)
  # p[j] = the row (1-based) on column j; invert to the column of each row.
  return jnp.zeros((n,), jnp.int32).at[p[1:] - 1].set(jnp.arange(n, dtype=jnp.int32))


def cost_matrix(probs, labels):
  """probs [T, V], labels [T] (-1 = not masked) -> the padded [T, T] cost (row = slot, column =
  the concept masked at that slot)."""
  t = labels.shape[0]
  real = labels >= 0
  p = jnp.take(probs.astype(jnp.float32), jnp.maximum(labels, 0), axis=1)  # [slot, concept]
  both = real[:, None] & real[None, :]
  neither = ~real[:, None] & ~real[None, :]
  return jnp.where(both, 1.0 - p, jnp.where(neither, 0.0, float(t + 1)))


def hungarian_targets(probs, labels):
  """probs [B, T, V] (softmax over the concept vocabulary, stop-gradient), labels [B, T]
  (original concept at masked slots, -1 elsewhere) -> int32 [B, T]: each example's masked
  concepts re-assigned to its masked slots at minimum total 1 - p; -1 at the other slots."""
  labels = labels.astype(jnp.int32)
  if probs.shape[:2] != labels.shape:
    raise ValueError(f"hungarian_targets: probs {probs.shape} do not fit labels {labels.shape}")

  def one(pr, y):
    col = solve(cost_matrix(jax.lax.stop_gradient(pr), y))
    return jnp.where(y >= 0, y[col], -1)

  return jax.vmap(one)(probs, labels)
