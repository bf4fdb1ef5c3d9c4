"""ITC, ITM, MLM and box losses against NumPy references on hand-made inputs.

The official losses: docs/fidelity.md#losses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2vlm_jax import losses


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_itc(v, t, temp, valid=None, ids=None):
  """Loop-free NumPy version of the official ITC loss on the valid sub-batch only."""
  keep = np.ones(len(v), bool) if valid is None else np.asarray(valid) > 0
  v, t = v[keep].astype(np.float64), t[keep].astype(np.float64)
  v /= np.linalg.norm(v, axis=1, keepdims=True)
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  logits = v @ t.T / temp
  if ids is None:
    target = np.eye(len(v))
  else:
    i = np.asarray(ids)[keep]
    pos = (i[:, None] == i[None, :]).astype(np.float64)
    target = pos / pos.sum(1, keepdims=True)
  i2t = -(target * np_log_softmax(logits)).sum(1).mean()
  t2i = -(target * np_log_softmax(logits.T)).sum(1).mean()
  return 0.5 * (i2t + t2i)


@pytest.fixture
def feats():
  rng = np.random.default_rng(0)
  return rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(7, 5)).astype(np.float32)


def test_itc_plain(feats):
  v, t = feats
  np.testing.assert_allclose(losses.itc_loss(v, t, 0.07), np_itc(v, t, 0.07), rtol=1e-5)
  # bf16 input is computed in float32.
  out = losses.itc_loss(v.astype(jnp.bfloat16), t.astype(jnp.bfloat16), 0.07)
  assert out.dtype == jnp.float32


def test_itc_padding_rows_and_columns_excluded(feats):
  v, t = feats
  valid = np.array([1, 1, 0, 1, 1, 0, 1])
  ref = np_itc(v, t, 0.2, valid)
  np.testing.assert_allclose(losses.itc_loss(v, t, 0.2, valid=valid), ref, rtol=1e-5)
  # Padding content is irrelevant.
  v2 = v.copy()
  v2[[2, 5]] = 100.0
  np.testing.assert_allclose(losses.itc_loss(v2, t, 0.2, valid=valid), ref, rtol=1e-5)


def test_itc_soft_targets_with_ids(feats):
  v, t = feats
  ids = np.array([3, 1, 3, 2, 1, 3, 0])
  valid = np.array([1, 1, 1, 1, 1, 0, 1])
  np.testing.assert_allclose(
    losses.itc_loss(v, t, 0.1, ids=ids), np_itc(v, t, 0.1, ids=ids), rtol=1e-5
  )
  np.testing.assert_allclose(
    losses.itc_loss(v, t, 0.1, valid=valid, ids=ids), np_itc(v, t, 0.1, valid, ids), rtol=1e-5
  )
  # All ids distinct = the plain diagonal loss.
  np.testing.assert_allclose(
    losses.itc_loss(v, t, 0.1, ids=np.arange(7)), losses.itc_loss(v, t, 0.1), rtol=1e-6
  )


def test_itc_grad_scale_touches_features_not_temp(feats):
  v, t = feats
  temp = jnp.float32(0.07)
  f = lambda s: jax.value_and_grad(
    lambda a, b, c: losses.itc_loss(a, b, c, grad_scale=s), argnums=(0, 1, 2)
  )(v, t, temp)
  (l1, (gv1, gt1, gtemp1)), (l8, (gv8, gt8, gtemp8)) = f(None), f(1 / 8)
  assert float(l1) == float(l8)  # forward value unchanged, bit for bit
  np.testing.assert_allclose(gv8, gv1 / 8, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(gt8, gt1 / 8, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(gtemp8, gtemp1, rtol=1e-6)
  assert abs(float(gtemp1)) > 0


def test_itc_all_padding_is_zero_without_nan(feats):
  v, t = feats
  loss, g = jax.value_and_grad(losses.itc_loss)(v, t, 0.07, valid=np.zeros(7))
  assert float(loss) == 0.0 and np.all(np.isfinite(g))


def test_itc_bad_shapes_name_the_field(feats):
  v, t = feats
  with pytest.raises(ValueError, match="text_feat"):
    losses.itc_loss(v, t[:, :4], 0.07)
  with pytest.raises(ValueError, match="valid"):
    losses.itc_loss(v, t, 0.07, valid=np.ones(6))


def test_itm_loss():
  rng = np.random.default_rng(1)
  pos, ni, nt = (rng.normal(size=(4, 2)).astype(np.float32) for _ in range(3))
  logits = np.concatenate([pos, ni, nt])
  labels = np.array([1] * 4 + [0] * 8)
  nll = -np_log_softmax(logits.astype(np.float64))[np.arange(12), labels]
  np.testing.assert_allclose(losses.itm_loss(pos, ni, nt), nll.mean(), rtol=1e-6)
  valid = np.array([1, 0, 1, 1])
  w = np.tile(valid, 3)
  np.testing.assert_allclose(
    losses.itm_loss(pos, ni, nt, valid=valid), (nll * w).sum() / w.sum(), rtol=1e-6
  )
  # A row without a negative image drops only that negative pair.
  w2 = w.copy()
  w2[4 + 2] = 0
  np.testing.assert_allclose(
    losses.itm_loss(pos, ni, nt, valid=valid, neg_image_valid=np.array([1, 1, 0, 1])),
    (nll * w2).sum() / w2.sum(),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="logits_neg_txt"):
    losses.itm_loss(pos, ni, nt[:3])


def test_mlm_loss_and_accuracy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 3, 11)).astype(np.float32)
  labels = np.array([[4, 7, 0], [1, -100, 0]])
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  logits[0, 1, 7] = 9.0  # make one prediction right
  lp = np_log_softmax(logits.astype(np.float64))
  real = [(0, 0), (0, 1), (1, 0)]
  ref = -np.mean([lp[b, m, labels[b, m]] for b, m in real])
  acc = np.mean([logits[b, m].argmax() == labels[b, m] for b, m in real])
  loss, accuracy = losses.mlm_loss(logits, labels, weights)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(accuracy, acc)
  assert float(accuracy) >= 1 / 3


def test_mlm_no_masked_tokens_is_zero_without_nan():
  logits = jnp.ones((2, 3, 5), jnp.bfloat16)
  (loss, acc), g = jax.value_and_grad(losses.mlm_loss, has_aux=True)(
    logits, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))
  )
  assert float(loss) == 0.0 and float(acc) == 0.0 and loss.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(g, np.float32)))


def np_box_loss(pred, target, is_image):
  """Official formula: L1 summed over coordinates + 1 - diag(GIoU), / number of region rows."""
  keep = 1 - np.asarray(is_image, np.float64)
  l1 = (np.abs(pred - target).sum(1) * keep).sum() / keep.sum()

  def xyxy(b):
    return np.stack(
      [b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2],
      1,
    )

  a, b = xyxy(pred.astype(np.float64)), xyxy(target.astype(np.float64))
  lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), 1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  union = area(a) + area(b) - inter
  c = np.prod(np.maximum(a[:, 2:], b[:, 2:]) - np.minimum(a[:, :2], b[:, :2]), 1)
  giou = inter / union - (c - union) / c
  return l1, ((1 - giou) * keep).sum() / keep.sum()


def test_box_loss_matches_numpy():
  rng = np.random.default_rng(3)
  pred = rng.uniform(0.1, 0.6, (6, 4)).astype(np.float32)
  target = rng.uniform(0.1, 0.6, (6, 4)).astype(np.float32)
  is_image = np.array([0, 1, 0, 0, 1, 0])
  target[1] = target[4] = [0.5, 0.5, 1, 1]
  l1, giou = losses.box_loss(pred, target, is_image)
  ref_l1, ref_giou = np_box_loss(pred, target, is_image)
  np.testing.assert_allclose(l1, ref_l1, rtol=1e-5)
  np.testing.assert_allclose(giou, ref_giou, rtol=1e-5)
  # Padding rows are dropped like whole-image rows (and their content does not matter).
  valid = np.array([1, 1, 1, 0, 1, 1])
  pred2 = pred.copy()
  pred2[3] = [5, 5, -1, -1]  # a degenerate padding row must not zero the batch's GIoU
  l1v, gv = losses.box_loss(pred2, target, is_image, valid=valid)
  sub = np.array([0, 1, 2, 4, 5])
  ref_l1, ref_giou = np_box_loss(pred[sub], target[sub], is_image[sub])
  np.testing.assert_allclose(l1v, ref_l1, rtol=1e-5)
  np.testing.assert_allclose(gv, ref_giou, rtol=1e-5)


def test_box_loss_guards():
  pred = jnp.array([[0.5, 0.5, 0.2, 0.2], [0.4, 0.4, 0.1, 0.3]])
  target = jnp.array([[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]])
  # No region box at all: both terms 0, gradient finite (official code divides by zero).
  f = lambda p, t, i: sum(losses.box_loss(p, t, i))
  loss, g = jax.value_and_grad(f)(pred, target, jnp.array([1, 1]))
  assert float(loss) == 0.0 and np.all(np.isfinite(g))
  # A degenerate target (w < 0) zeroes the GIoU of the whole batch; L1 stays.
  bad = target.at[1].set(jnp.array([0.3, 0.3, -0.1, 0.2]))
  (l1, giou) = losses.box_loss(pred, bad, jnp.array([0, 0]))
  assert float(giou) == 0.0 and float(l1) > 0
  g = jax.grad(f)(pred, bad, jnp.array([0, 0]))
  assert np.all(np.isfinite(g))
  # Zero-size predictions (sigmoid can give w = h = 0) are not degenerate and stay finite.
  zero = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.4, 0.4, 0.0, 0.0]])
  l1, giou = losses.box_loss(zero, zero, jnp.array([0, 0]))
  assert float(l1) == 0.0 and np.isfinite(float(giou))
  assert np.all(np.isfinite(jax.grad(f)(zero, zero, jnp.array([0, 0]))))
  with pytest.raises(ValueError, match="is_image"):
    losses.box_loss(pred, target, jnp.array([0, 0, 1]))


def test_combine():
  terms = {
    "image": {"itc": jnp.float32(1.0), "itm": jnp.float32(2.0), "mlm": jnp.float32(3.0)},
    "region": {"itc": jnp.float32(0.5), "box_giou": jnp.float32(0.25)},
  }
  total, metrics = losses.combine(terms, {"region": 0.5, "video": 3.0})
  np.testing.assert_allclose(total, 6.0 + 0.5 * 0.75)
  assert metrics["loss/itc/image"] == 1.0 and metrics["loss/box_giou/region"] == 0.25
  np.testing.assert_allclose(metrics["loss/total"], total)
  assert set(metrics) == {
    "loss/itc/image",
    "loss/itm/image",
    "loss/mlm/image",
    "loss/itc/region",
    "loss/box_giou/region",
    "loss/total",
  }
  with pytest.raises(ValueError, match="image/itc"):
    losses.combine({"image": {"itc": jnp.ones(2)}}, {})
  # Per-term weights apply in every kind; the logged terms stay unweighted.
  total, metrics = losses.combine(terms, {"region": 0.5}, {"itc": 2.0, "box_giou": 4.0})
  np.testing.assert_allclose(total, (2.0 + 2.0 + 3.0) + 0.5 * (2 * 0.5 + 4 * 0.25))
  assert metrics["loss/box_giou/region"] == 0.25
  with pytest.raises(ValueError, match="unknown loss terms"):
    losses.combine(terms, {}, {"box": 2.0})
