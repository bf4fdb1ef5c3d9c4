"""Box formats, IoU and generalised IoU as pure float32 functions on arrays.

Conventions: the model predicts normalised (cx, cy, w, h) boxes (docs/fidelity.md#box-loss); IoU
and GIoU work on corner boxes (x0, y0, x1, y1). GIoU follows the DETR definition (the official
box loss calls DETR's `generalized_box_iou`): GIoU = IoU - (C - U) / C with C the area of the
smallest enclosing box and U the union.

Unlike DETR, every division here is guarded: a non-positive union or enclosing area gives 0
instead of NaN, and the guard is applied *before* dividing so that gradients stay finite too
(a `jnp.where` after a 0/0 would still leak NaN into the backward pass).

`legacy_pixel_iou` reproduces the inclusive-pixel IoU of the RefCOCO grounding evaluation
(docs/fidelity.md#legacy-pixel-iou), which is not the same number as `elementwise_iou` on the
same boxes.
"""

from __future__ import annotations

import jax.numpy as jnp


def _f32(x) -> jnp.ndarray:
  return jnp.asarray(x, jnp.float32)


def _safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """num / den, and 0 where den <= 0 (finite value and finite gradient)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def cxcywh_to_xyxy(boxes) -> jnp.ndarray:
  """(cx, cy, w, h) -> (x0, y0, x1, y1) = (cx - w/2, cy - h/2, cx + w/2, cy + h/2). [..., 4]."""
  b = _f32(boxes)
  cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes) -> jnp.ndarray:
  """(x0, y0, x1, y1) -> (cx, cy, w, h). [..., 4]."""
  b = _f32(boxes)
  x0, y0, x1, y1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes) -> jnp.ndarray:
  """Area of corner boxes [..., 4] -> [...]; negative for inverted boxes (as DETR)."""
  b = _f32(boxes)
  return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def is_degenerate(boxes) -> jnp.ndarray:
  """Corner boxes [..., 4] -> bool [...]: x1 < x0 or y1 < y0.

  This is the official early check (docs/fidelity.md#box-loss): strict, so a zero-size box is
  *not* degenerate. Boxes made from a sigmoid (w, h >= 0) can never be degenerate; only targets
  can.
  """
  b = _f32(boxes)
  return (b[..., 2] < b[..., 0]) | (b[..., 3] < b[..., 1])


def _iou_parts(a: jnp.ndarray, b: jnp.ndarray):
  """Broadcasting core: corner boxes a, b [..., 4] -> (inter, union, enclosing area) [...]."""
  lt = jnp.maximum(a[..., :2], b[..., :2])  # [..., 2]
  rb = jnp.minimum(a[..., 2:], b[..., 2:])  # [..., 2]
  wh = jnp.clip(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a) + box_area(b) - inter
  c_lt = jnp.minimum(a[..., :2], b[..., :2])
  c_rb = jnp.maximum(a[..., 2:], b[..., 2:])
  c_wh = jnp.clip(c_rb - c_lt, 0.0)
  enclosing = c_wh[..., 0] * c_wh[..., 1]
  return inter, union, enclosing


def elementwise_iou(boxes1, boxes2) -> jnp.ndarray:
  """IoU of matching rows: corner boxes [N, 4], [N, 4] -> [N] (0 where the union is 0)."""
  inter, union, _ = _iou_parts(_f32(boxes1), _f32(boxes2))
  return _safe_div(inter, union)


def elementwise_giou(boxes1, boxes2) -> jnp.ndarray:
  """Generalised IoU of matching rows: corner boxes [N, 4], [N, 4] -> [N] in [-1, 1].

  Equal to the diagonal of `pairwise_giou` (what the official loss takes) at O(N) cost.
  """
  inter, union, enclosing = _iou_parts(_f32(boxes1), _f32(boxes2))
  return _safe_div(inter, union) - _safe_div(enclosing - union, enclosing)


def pairwise_iou(boxes1, boxes2) -> jnp.ndarray:
  """IoU of every pair: corner boxes [N, 4], [M, 4] -> [N, M]."""
  a, b = _f32(boxes1)[:, None, :], _f32(boxes2)[None, :, :]  # [N, 1, 4], [1, M, 4]
  inter, union, _ = _iou_parts(a, b)
  return _safe_div(inter, union)


def pairwise_giou(boxes1, boxes2) -> jnp.ndarray:
  """Generalised IoU of every pair (DETR `generalized_box_iou`): [N, 4], [M, 4] -> [N, M]."""
  a, b = _f32(boxes1)[:, None, :], _f32(boxes2)[None, :, :]  # [N, 1, 4], [1, M, 4]
  inter, union, enclosing = _iou_parts(a, b)
  return _safe_div(inter, union) - _safe_div(enclosing - union, enclosing)


def legacy_pixel_iou(boxes1, boxes2) -> jnp.ndarray:
  """Grounding-evaluation IoU of (x, y, w, h) pixel boxes [..., 4], [..., 4] -> [...].

  Inclusive pixel coordinates, as the RefCOCO evaluation of the official code
  (docs/fidelity.md#legacy-pixel-iou): the intersection spans
  max(x1, x2) .. min(x1 + w1 - 1, x2 + w2 - 1) inclusive (hence the +1), and counts only when
  both spans are strictly positive in that convention (left < right and top < bottom, the
  REFER-toolkit test), else 0. Areas are w * h (no +1), so union = w1*h1 + w2*h2 - inter.
  """
  a, b = _f32(boxes1), _f32(boxes2)
  left = jnp.maximum(a[..., 0], b[..., 0])
  top = jnp.maximum(a[..., 1], b[..., 1])
  right = jnp.minimum(a[..., 0] + a[..., 2] - 1, b[..., 0] + b[..., 2] - 1)
  bottom = jnp.minimum(a[..., 1] + a[..., 3] - 1, b[..., 1] + b[..., 3] - 1)
  overlaps = (left < right) & (top < bottom)
  inter = jnp.where(overlaps, (right - left + 1) * (bottom - top + 1), 0.0)
  union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
  return _safe_div(inter, union)
