"""ITM hard-negative sampling: exclusions, distribution, per-shard locality, shard_map parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from x2vlm_jax import losses
from x2vlm_jax.sharding import make_mesh

N, DRAWS = 12, 3000  # one batch size and draw count for all tests: few jit compiles


@functools.partial(jax.jit, static_argnames=("num_shards",))
def _draw_many(keys, v, t, temp, valid, ids, num_shards=1):
  """DRAWS independent samplings of the same batch: ([DRAWS, N], [DRAWS, N])."""
  return jax.vmap(lambda k: losses.sample_hard_negatives(k, v, t, temp, valid, ids, num_shards))(
    keys
  )


def _keys(seed):
  return jax.random.split(jax.random.key(seed), DRAWS)


def _feats(n=N, e=6, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, e)).astype(np.float32), rng.normal(size=(n, e)).astype(np.float32)


def np_weights(v, t, temp, valid, ids):
  """NumPy version of the official weights: softmax(sim / temp) + 1e-5, positives and padding 0."""
  v = v / np.linalg.norm(v, axis=1, keepdims=True)
  t = t / np.linalg.norm(t, axis=1, keepdims=True)
  sim = (v @ t.T / temp).astype(np.float64)
  ok = np.asarray(valid) > 0

  def one(s):
    s = np.where(ok[None, :], s, -np.inf)
    p = np.exp(s - s.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True) + 1e-5
    pos = np.asarray(ids)[:, None] == np.asarray(ids)[None, :]
    return np.where(ok[None, :] & ~pos, p, 0.0)

  return one(sim), one(sim.T)  # (i2t: texts for each image, t2i: images for each text)


def test_never_positive_same_id_or_padding():
  v, t = _feats()
  ids = np.array([0, 0, 1, 2, 3, 3, 4, 5, 5, 5, 6, 7])
  valid = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1])
  neg_img, neg_txt = map(np.asarray, _draw_many(_keys(0), v, t, 0.1, valid, ids))
  for neg in (neg_img, neg_txt):
    assert np.all(ids[neg] != ids[None, :]), "drew a same-id (positive) item"
    assert np.all(valid[neg] == 1), "drew a padding row"
  # Without ids (pre-training) only the exact diagonal is excluded: rows 0 and 1 share an id
  # above but can be drawn as each other's negatives here.
  neg_img, _ = map(np.asarray, _draw_many(_keys(1), v, t, 10.0, valid, np.arange(N)))
  assert np.all(neg_img != np.arange(N)[None, :])
  assert np.any(neg_img[:, 0] == 1)


def test_follows_weights_chi_square():
  v, t = _feats(seed=3)
  valid, temp = (np.arange(N) % 5 != 3).astype(np.int32), 0.3
  ids = np.arange(N) // 2
  w_i2t, w_t2i = np_weights(v, t, temp, valid, ids)
  neg_img, neg_txt = map(np.asarray, _draw_many(_keys(42), v, t, temp, valid, ids))
  for row in (0, 5, 11):
    for neg, w in ((neg_img, w_t2i), (neg_txt, w_i2t)):
      p = w[row] / w[row].sum()
      support = p > 0
      observed = np.bincount(neg[:, row], minlength=N)
      assert observed[~support].sum() == 0
      _, pvalue = stats.chisquare(observed[support], p[support] * DRAWS)
      assert pvalue > 1e-3, (row, observed, p)


def test_per_shard_locality_and_fallback():
  shards = 4
  b = N // shards
  v, t = _feats(seed=5)
  valid = np.ones(N, np.int32)
  valid[[4, 5]] = 0  # shard 1 has a single valid row (3): it has no possible negative
  neg_img, neg_txt = map(
    np.asarray, _draw_many(_keys(7), v, t, 0.07, valid, np.arange(N), num_shards=shards)
  )
  rows = np.arange(N)[None, :]
  for neg in (neg_img, neg_txt):
    assert np.all(neg // b == rows // b), "a row drew outside its shard"
    assert np.all(neg[:, 3] == 3)  # fallback: its own index, so the caller can drop the pair
    others = np.array([0, 1, 2, 6, 7, 8, 9, 10, 11])
    assert np.all(neg[:, others] != rows[:, others])
  # With one shard (the whole batch) rows do draw across those boundaries.
  full, _ = _draw_many(_keys(7), v, t, 0.07, valid, np.arange(N))
  assert np.any(np.asarray(full) // b != rows // b)
  with pytest.raises(ValueError, match="divisible"):
    losses.sample_hard_negatives(jax.random.key(1), v, t, 0.07, num_shards=5)


def test_shard_map_equals_num_shards():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # 4 batch shards, replicated on tensor
  v, t = _feats(seed=9)
  valid = (np.arange(N) % 7 != 3).astype(np.int32)
  ids = np.arange(N) // 2  # pairs of duplicates
  keys = _keys(11)
  expected = _draw_many(keys, v, t, 0.05, valid, ids, num_shards=4)
  got = jax.jit(
    lambda k, a, b: losses.sample_hard_negatives_sharded(
      mesh, k, a, b, jnp.float32(0.05), valid, ids
    )
  )(keys[5], v, t)
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(e)[5])
  assert not got[0].sharding.is_fully_replicated
  # Without ids and valid (the pre-training call), unjitted.
  g = losses.sample_hard_negatives_sharded(mesh, keys[9], v, t, 0.05)
  e = _draw_many(keys, v, t, 0.05, np.ones(N, np.int32), np.arange(N), num_shards=4)
  np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(e[0])[9])
  np.testing.assert_array_equal(np.asarray(g[1]), np.asarray(e[1])[9])
