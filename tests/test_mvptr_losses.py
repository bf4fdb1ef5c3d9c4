"""MVPTR objectives against NumPy references on hand-made inputs, both variants where the paper
and the released code differ; the Hungarian step against brute force and scipy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from x2vlm_jax import mvptr_assign as MA
from x2vlm_jax import mvptr_concepts as MC
from x2vlm_jax import mvptr_losses as ML

RNG = np.random.default_rng(0)


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_infonce(t, v, scale):
  logits = np.exp(scale) * t @ v.T
  d = np.arange(len(t))
  return 0.5 * (-np_log_softmax(logits, 1)[d, d].mean() - np_log_softmax(logits, 0)[d, d].mean())


def test_vsc_global_vs_per_device():
  t, v = unit(RNG.standard_normal((6, 5))), unit(RNG.standard_normal((6, 5)))
  scale = np.log(1 / 0.07)
  paper = float(ML.vsc_loss(t, v, scale))
  code = float(ML.vsc_loss(t, v, scale, variant="code", shards=2))
  np.testing.assert_allclose(paper, np_infonce(t, v, scale), rtol=1e-5)
  want = 0.5 * (np_infonce(t[:3], v[:3], scale) + np_infonce(t[3:], v[3:], scale))
  np.testing.assert_allclose(code, want, rtol=1e-5)
  assert abs(paper - code) > 1e-3
  with pytest.raises(ValueError, match="divisible"):
    ML.vsc_loss(t, v, scale, variant="code", shards=4)
  with pytest.raises(ValueError, match="variant"):
    ML.vsc_loss(t, v, scale, variant="other")


def brute_force(cost):
  n = cost.shape[0]
  return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))


def test_hungarian_assignment_is_optimal_and_equals_scipy():
  for n in (1, 3, 5):
    cost = RNG.random((n, n))
    rows, cols = linear_sum_assignment(cost)
    np.testing.assert_allclose(cost[rows, cols].sum(), brute_force(cost))
  # Our per-example step: masked slots 0, 2, 3, 5 of example 0; 1, 4 of example 1; none in 2.
  probs = RNG.dirichlet(np.ones(9), size=(3, 6))  # [B, T, V]
  labels = np.full((3, 6), -1)
  labels[0, [0, 2, 3, 5]] = [4, 7, 1, 4]  # a repeated concept is two separate labels
  labels[1, [1, 4]] = [8, 2]
  got = MC.hungarian_targets(probs, labels)
  assert (got[2] == -1).all()
  for b in (0, 1):
    slots = np.flatnonzero(labels[b] >= 0)
    assert sorted(got[b, slots]) == sorted(labels[b, slots])  # the same concepts, re-assigned
    assert (got[b][labels[b] < 0] == -1).all()
    cost = 1.0 - probs[b][np.ix_(slots, labels[b, slots])]
    achieved = sum(1.0 - probs[b, s, got[b, s]] for s in slots)
    np.testing.assert_allclose(achieved, brute_force(cost))
  with pytest.raises(ValueError, match="concept id"):
    MC.hungarian_targets(probs[:, :, :3], labels)


def test_in_graph_hungarian_equals_scipy():
  """The jitted solver = the SciPy host reference on random (tie-free) probabilities: random
  masks of every density, rows with no masked slot, rows with every slot masked, repeated
  concepts; at a small and at the largest tag length (30)."""
  f = jax.jit(MA.hungarian_targets)
  for b, t, v in ((96, 7, 11), (12, 30, 40)):
    probs = RNG.dirichlet(np.ones(v), size=(b, t)).astype(np.float32)
    density = RNG.random((b, 1))
    labels = np.where(RNG.random((b, t)) < density, RNG.integers(0, v, (b, t)), -1)
    labels[0], labels[1] = -1, RNG.integers(0, v, t)  # none masked; all masked
    labels[2] = RNG.permutation(v)[:t] if t <= v else labels[2]  # all masked, distinct concepts
    labels[3] = -1
    labels[3, RNG.integers(0, t)] = RNG.integers(0, v)  # exactly one
    got = np.asarray(f(probs, labels))
    np.testing.assert_array_equal(got, MC.hungarian_targets(probs, labels))
  # The bare solver on square costs (no padding) = linear_sum_assignment's columns.
  cost = RNG.random((20, 9, 9)).astype(np.float32)
  cols = np.asarray(jax.jit(jax.vmap(MA.solve))(cost))
  np.testing.assert_array_equal(cols, [linear_sum_assignment(c)[1] for c in cost])
  with pytest.raises(ValueError, match="do not fit"):
    MA.hungarian_targets(probs[:, :3], labels)


def test_mcr_loss_paper_targets_and_code_off():
  logits = RNG.standard_normal((2, 4, 7)).astype(np.float32)
  labels = np.array([[3, 0, 6, -1], [2, 2, -1, -1]])
  weights = (labels >= 0).astype(np.float32)
  loss, _ = ML.mcr_loss(logits, labels, weights)
  lp = np_log_softmax(logits.astype(np.float64), -1)
  want = -np.mean([lp[b, m, labels[b, m]] for b in range(2) for m in range(4) if labels[b, m] >= 0])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # Matching can only lower the loss of the original slot order (cost 1 - p is minimised).
  probs = np.exp(lp)
  matched, _ = ML.mcr_loss(logits, MC.hungarian_targets(probs, labels), weights)
  assert float(matched) <= float(loss) + 1e-6
  # Code: textual MCR is disabled (labels -1 in the released code) -> exactly 0, zero gradient.
  g = jax.grad(lambda x: ML.mcr_loss(x, labels, weights, enabled=False)[0])(jnp.asarray(logits))
  assert float(ML.mcr_loss(logits, labels, weights, enabled=False)[0]) == 0.0
  assert not np.any(np.asarray(g))


def test_mask_concepts_rate_and_split():
  ids = RNG.integers(5, 50, (400, 30))
  valid = np.ones_like(ids)
  valid[:, 25:] = 0
  out, labels = MC.mask_concepts(
    np.random.default_rng(1), ids, valid, rate=0.25, mask_id=3, vocab=(5, 50)
  )
  chosen = labels >= 0
  assert not chosen[:, 25:].any() and (out[:, 25:] == ids[:, 25:]).all()
  assert abs(chosen[:, :25].mean() - 0.25) < 0.01
  assert abs((out[chosen] == 3).mean() - 0.8) < 0.02
  assert (labels[chosen] == ids[chosen]).all() and (out[~chosen] == ids[~chosen]).all()


def test_pick_negatives_modes():
  sim = RNG.uniform(-1, 1, (5, 5)).astype(np.float32)
  np.fill_diagonal(sim, 1.0)
  hardest = np.asarray(ML.pick_negatives(None, sim, 0.0, "hardest"))
  np.testing.assert_array_equal(hardest, np.argmax(sim - 2 * np.eye(5), axis=1))
  valid = np.array([1, 1, 1, 1, 0])
  keys = jax.random.split(jax.random.key(0), 200)
  for mode in ("sample", "uniform"):
    draws = np.asarray(jax.vmap(lambda k: ML.pick_negatives(k, sim, 0.0, mode, valid))(keys))
    assert not (draws == np.arange(5)).any() and not (draws == 4).any()
    assert len(np.unique(draws[:, 0])) == 3  # every other valid image is drawn
  # A sharp VSC softmax makes sampling pick the hardest negative.
  sharp = np.asarray(ML.pick_negatives(jax.random.key(1), sim, 20.0, "sample"))
  np.testing.assert_array_equal(sharp, hardest)


def test_code_negatives_stay_on_their_device():
  """shards=2: rows 0-3 draw among columns 0-3, rows 4-7 among 4-7 (per-GPU negatives)."""
  sim = RNG.uniform(-1, 1, (8, 8)).astype(np.float32)
  block = np.arange(8) // 4
  hardest = np.asarray(ML.pick_negatives(None, sim, 0.0, "hardest", shards=2))
  local = np.where(block[:, None] == block[None, :], sim - 2 * np.eye(8), -np.inf)
  np.testing.assert_array_equal(hardest, np.argmax(local, axis=1))
  keys = jax.random.split(jax.random.key(0), 100)
  draws = np.asarray(jax.vmap(lambda k: ML.pick_negatives(k, sim, 0.0, "uniform", shards=2))(keys))
  assert (block[draws] == block[None, :]).all() and not (draws == np.arange(8)).any()
  assert len(np.unique(draws[:, 0])) == 3
  hard_img, hard_txt = jnp.array(hardest), jnp.array(hardest[::-1].copy())
  texts, images = ML.itm_pairs(jax.random.key(3), hard_img, hard_txt, shards=2)
  texts, images = np.asarray(texts), np.asarray(images)
  # image halves first: 2 rows of each block keep their text; then 2 rows of each keep the image
  assert sorted(block[texts[:4]]) == [0, 0, 1, 1] and sorted(block[images[4:]]) == [0, 0, 1, 1]
  assert sorted(texts[:4].tolist() + images[4:].tolist()) == list(range(8))
  with pytest.raises(ValueError, match="device shards"):
    ML.pick_negatives(None, sim[:6, :6], 0.0, "hardest", shards=4)


def test_itm_pairs_and_loss():
  hard_img, hard_txt = jnp.array([1, 2, 3, 0]), jnp.array([3, 0, 1, 2])
  texts, images = ML.itm_pairs(jax.random.key(0), hard_img, hard_txt)
  texts, images = np.asarray(texts), np.asarray(images)
  img_half = [(t, i) for t, i in zip(texts[:2], images[:2])]
  txt_half = [(t, i) for t, i in zip(texts[2:], images[2:])]
  assert all(i == int(hard_img[t]) for t, i in img_half)
  assert all(t == int(hard_txt[i]) for t, i in txt_half)
  assert sorted(texts[:2].tolist() + images[2:].tolist()) == [0, 1, 2, 3]
  pos, neg = RNG.standard_normal((4, 2)), RNG.standard_normal((4, 2))
  for match in (0, 1):
    lp = np_log_softmax(np.concatenate([pos, neg]), -1)
    labels = [match] * 4 + [1 - match] * 4
    want = -np.mean(lp[np.arange(8), labels])
    np.testing.assert_allclose(float(ML.itm_loss(pos, neg, match_class=match)), want, rtol=1e-5)


def np_scores(p, pv, r, rv, pick=None):
  cos = np.einsum("bpd,brd->bpr", unit(p), unit(r))
  out = []
  for b in range(len(p)):
    vals = []
    for i in np.flatnonzero(pv[b]):
      c = np.sort(cos[b, i][rv[b] > 0])[::-1]
      vals.append(c[0] if pick is None else c[pick[b, i]])
    out.append(np.mean(vals) if vals else 0.0)
  return np.array(out)


def test_phrase_region_score_and_wpg():
  p, r = RNG.standard_normal((3, 4, 6)), RNG.standard_normal((3, 5, 6))
  pv = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
  rv = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
  paper = np.asarray(ML.phrase_region_score(p, pv, r, rv))
  np.testing.assert_allclose(paper, np_scores(p, pv, r, rv), rtol=1e-5, atol=1e-6)
  key = jax.random.key(3)
  code = np.asarray(ML.phrase_region_score(p, pv, r, rv, variant="code", key=key))
  # The draw: uniform over the top min(3, real regions) of each phrase.
  u = np.asarray(jax.random.uniform(key, (3, 4)))
  limit = np.minimum(rv.sum(1), 3)[:, None]
  np.testing.assert_allclose(
    code, np_scores(p, pv, r, rv, (u * limit).astype(int)), rtol=1e-5, atol=1e-6
  )
  assert np.all(code[:2] <= paper[:2] + 1e-6) and np.any(code[:2] < paper[:2] - 1e-4)
  with pytest.raises(ValueError, match="key"):
    ML.phrase_region_score(p, pv, r, rv, variant="code")
  pos, neg = np.array([0.5, 0.1, 0.9]), np.array([0.4, 0.5, 0.0])
  want = np.mean([max(0, 0.2 + 0.4 - 0.5), max(0, 0.2 + 0.5 - 0.1)])  # text 2 has no phrase
  np.testing.assert_allclose(float(ML.wpg_loss(pos, neg, pv)), want, rtol=1e-6)
  assert float(ML.wpg_loss(pos, neg, np.zeros_like(pv))) == 0.0
