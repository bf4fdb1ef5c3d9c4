"""Box formats, IoU / GIoU (DETR definition) and the legacy grounding IoU against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2vlm_jax import box_ops


def np_giou(a, b):
  """Plain NumPy generalised IoU of two corner boxes (DETR formula, no guards)."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  cw = max(a[2], b[2]) - min(a[0], b[0])
  ch = max(a[3], b[3]) - min(a[1], b[1])
  c = cw * ch
  return inter / union, inter / union - (c - union) / c


def refer_iou(b1, b2):
  """Inclusive-pixel IoU of (x, y, w, h) boxes as in the REFER grounding evaluation."""
  left, top = max(b1[0], b2[0]), max(b1[1], b2[1])
  right = min(b1[0] + b1[2] - 1, b2[0] + b2[2] - 1)
  bottom = min(b1[1] + b1[3] - 1, b2[1] + b2[3] - 1)
  inter = (right - left + 1) * (bottom - top + 1) if left < right and top < bottom else 0
  return inter / (b1[2] * b1[3] + b2[2] * b2[3] - inter)


def test_format_round_trip():
  cxcywh = np.array([[0.5, 0.5, 1.0, 1.0], [0.3, 0.6, 0.2, 0.4]], np.float32)
  xyxy = box_ops.cxcywh_to_xyxy(cxcywh)
  np.testing.assert_allclose(xyxy, [[0, 0, 1, 1], [0.2, 0.4, 0.4, 0.8]], atol=1e-7)
  np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-7)
  assert box_ops.cxcywh_to_xyxy(jnp.ones((2, 4), jnp.bfloat16)).dtype == jnp.float32


@pytest.mark.parametrize(
  "a, b, iou, giou",
  [
    ((0, 0, 1, 1), (0, 0, 1, 1), 1.0, 1.0),  # identical
    ((0, 0, 1, 1), (2, 0, 3, 1), 0.0, -1 / 3),  # disjoint: C = 3, U = 2
    ((0, 0, 4, 4), (1, 1, 3, 3), 0.25, 0.25),  # nested: C = U
    ((0, 0, 1, 1), (1, 0, 2, 1), 0.0, 0.0),  # touching: C = U = 2
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7, 1 / 7 - 2 / 9),  # partial overlap
  ],
)
def test_known_pairs(a, b, iou, giou):
  a, b = np.array([a], np.float32), np.array([b], np.float32)
  np.testing.assert_allclose(box_ops.elementwise_iou(a, b), [iou], atol=1e-6)
  np.testing.assert_allclose(box_ops.elementwise_giou(a, b), [giou], atol=1e-6)
  np.testing.assert_allclose(box_ops.pairwise_giou(a, b), [[giou]], atol=1e-6)
  np.testing.assert_allclose(box_ops.pairwise_giou(b, a), [[giou]], atol=1e-6)  # symmetric


def test_pairwise_matches_numpy_and_diagonal():
  rng = np.random.default_rng(0)
  c = rng.uniform(0.2, 0.8, (5, 2))
  wh = rng.uniform(0.05, 0.5, (5, 2))
  a = np.asarray(box_ops.cxcywh_to_xyxy(np.concatenate([c, wh], 1)))
  b = np.asarray(box_ops.cxcywh_to_xyxy(np.concatenate([c[::-1], wh], 1)))[:3]
  ref = np.array([[np_giou(x, y) for y in b] for x in a])  # [5, 3, 2]
  np.testing.assert_allclose(box_ops.pairwise_iou(a, b), ref[..., 0], atol=1e-6)
  np.testing.assert_allclose(box_ops.pairwise_giou(a, b), ref[..., 1], atol=1e-6)
  np.testing.assert_allclose(
    box_ops.elementwise_giou(a[:3], b), np.diag(box_ops.pairwise_giou(a[:3], b)), atol=1e-7
  )


def test_zero_size_boxes_are_finite_with_finite_gradients():
  # Two point boxes: DETR would give 0/0; here value and gradient stay finite.
  a = jnp.array([[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.3]])
  b = jnp.array([[0.5, 0.5, 0.5, 0.5], [0.2, 0.1, 0.2, 0.3]])
  g = box_ops.elementwise_giou(a, b)
  assert np.all(np.isfinite(g))
  grad = jax.grad(lambda x: box_ops.elementwise_giou(x, b).sum())(a)
  assert np.all(np.isfinite(grad))


def test_degenerate():
  boxes = np.array([[0, 0, 1, 1], [0.5, 0, 0.4, 1], [0, 0.5, 1, 0.2], [0.3, 0.3, 0.3, 0.3]])
  np.testing.assert_array_equal(box_ops.is_degenerate(boxes), [False, True, True, False])


def test_legacy_pixel_iou():
  rng = np.random.default_rng(1)
  b1 = rng.integers(0, 50, (64, 4)).astype(np.float32) + [0, 0, 1, 1]
  b2 = rng.integers(0, 50, (64, 4)).astype(np.float32) + [0, 0, 1, 1]
  ref = [refer_iou(x, y) for x, y in zip(b1, b2)]
  np.testing.assert_allclose(box_ops.legacy_pixel_iou(b1, b2), ref, rtol=1e-6)
  # A one-pixel-wide overlap counts as no overlap in this convention; the continuous IoU of
  # the same corner boxes does not.
  one = box_ops.legacy_pixel_iou(np.array([0, 0, 10, 10.0]), np.array([9, 0, 10, 10.0]))
  assert float(one) == 0.0
  np.testing.assert_allclose(
    box_ops.legacy_pixel_iou(np.array([0, 0, 10, 10.0]), np.array([5, 5, 10, 10.0])), 25 / 175
  )
  assert (
    float(box_ops.elementwise_iou(np.array([[0, 0, 10, 10.0]]), np.array([[9, 0, 19, 10.0]]))[0])
    > 0
  )
