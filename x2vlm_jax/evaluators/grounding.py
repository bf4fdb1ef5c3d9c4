"""Visual-grounding accuracy with the official RefCOCO protocol.

Official protocol: docs/fidelity.md#grounding-protocol. The model predicts a normalised
(cx, cy, w, h) box per referring expression. The official evaluation scales it by the original
image width/height, converts it to pixel (x, y, w, h) (top-left corner + size) and compares it
with the ground-truth pixel (x, y, w, h) box using the legacy inclusive-pixel IoU
(`box_ops.legacy_pixel_iou`, docs/fidelity.md#legacy-pixel-iou). A prediction is correct when
IoU >= 0.5 (the official test is `>=`, not `>`).

Two baselines a trained model must beat: always predicting the whole image (0, 0, W, H), and
always predicting the set's mean box (the mean normalised (cx, cy, w, h) of the ground truth of
the very rows evaluated, scaled to each image): what a box head that learned where boxes usually
are, but reads neither image nor phrase, would score.
"""

from __future__ import annotations

import numpy as np

from x2vlm_jax import box_ops

IOU_THRESHOLD = 0.5


def pred_to_pixel_xywh(pred_boxes, image_wh) -> np.ndarray:
  """Normalised (cx, cy, w, h) [N, 4] and (width, height) [N, 2] -> pixel (x, y, w, h) [N, 4]."""
  pred = np.asarray(pred_boxes, np.float32)
  wh = np.asarray(image_wh, np.float32)
  scale = np.concatenate([wh, wh], axis=-1)  # [N, 4]: W, H, W, H
  cx, cy, w, h = np.moveaxis(pred * scale, -1, 0)
  return np.stack([cx - w / 2, cy - h / 2, w, h], axis=-1)


def pixel_xywh_to_pred(boxes, image_wh) -> np.ndarray:
  """The inverse of `pred_to_pixel_xywh`: pixel (x, y, w, h) -> normalised (cx, cy, w, h)."""
  b = np.asarray(boxes, np.float32)
  wh = np.asarray(image_wh, np.float32)
  return np.concatenate([b[:, :2] + b[:, 2:] / 2, b[:, 2:]], axis=-1) / np.concatenate([wh, wh], -1)


def _check(pred, wh, gt, valid):
  n = pred.shape[0]
  if pred.shape != (n, 4):
    raise ValueError(f"pred_boxes must be [N, 4] normalised (cx, cy, w, h), got {pred.shape}")
  if wh.shape != (n, 2):
    raise ValueError(
      f"image_wh must be [N, 2] (width, height) in pixels with N={n}, got {wh.shape}"
    )
  if gt.shape != (n, 4):
    raise ValueError(f"gt_boxes must be [N, 4] pixel (x, y, w, h) with N={n}, got {gt.shape}")
  if valid is not None and valid.shape != (n,):
    raise ValueError(f"valid must be [N] with N={n}, got {valid.shape}")
  for name, arr in (("pred_boxes", pred), ("image_wh", wh), ("gt_boxes", gt)):
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=-1))
    if bad.size:
      raise ValueError(f"{name}[{bad[0]}] = {arr[bad[0]].tolist()} is not finite")
  bad = np.flatnonzero((wh <= 0).any(axis=-1))
  if bad.size:
    raise ValueError(f"image_wh[{bad[0]}] = {wh[bad[0]].tolist()} must be positive")


def evaluate_grounding(
  pred_boxes,
  image_wh,
  gt_boxes,
  *,
  valid=None,
  iou_threshold: float = IOU_THRESHOLD,
  prefix: str = "grounding",
) -> dict[str, float]:
  """Grounding accuracy (percent) of predicted boxes against ground-truth boxes.

  Args:
    pred_boxes: [N, 4] predicted normalised (cx, cy, w, h) (the sigmoid box head output).
    image_wh: [N, 2] original image (width, height) in pixels.
    gt_boxes: [N, 4] ground-truth pixel (x, y, w, h), as in the REFER annotations.
    valid: optional [N] mask; rows with 0 (batch padding) are ignored.
    iou_threshold: correct when IoU >= this (official: 0.5).
    prefix: metric-name prefix (e.g. 'grounding/testA').

  Returns:
    {prefix/acc, prefix/acc_whole_image, prefix/acc_mean_box, prefix/mean_iou (0..1),
     prefix/count}.
  """
  pred = np.asarray(pred_boxes, np.float32)
  wh = np.asarray(image_wh, np.float32)
  gt = np.asarray(gt_boxes, np.float32)
  valid = None if valid is None else np.asarray(valid).astype(bool)
  if pred.ndim != 2:
    raise ValueError(f"pred_boxes must be [N, 4] normalised (cx, cy, w, h), got {pred.shape}")
  _check(pred, wh, gt, valid)
  if valid is not None:
    pred, wh, gt = pred[valid], wh[valid], gt[valid]
  if pred.shape[0] == 0:
    raise ValueError("evaluate_grounding needs at least one (valid) example")
  iou = np.asarray(box_ops.legacy_pixel_iou(pred_to_pixel_xywh(pred, wh), gt))  # [N]
  whole = np.concatenate([np.zeros_like(wh), wh], axis=-1)  # [N, 4] (0, 0, W, H)
  iou_whole = np.asarray(box_ops.legacy_pixel_iou(whole, gt))
  mean_box = np.broadcast_to(pixel_xywh_to_pred(gt, wh).mean(axis=0), pred.shape)
  iou_mean = np.asarray(box_ops.legacy_pixel_iou(pred_to_pixel_xywh(mean_box, wh), gt))
  return {
    f"{prefix}/acc": 100.0 * float(np.mean(iou >= iou_threshold)),
    f"{prefix}/acc_whole_image": 100.0 * float(np.mean(iou_whole >= iou_threshold)),
    f"{prefix}/acc_mean_box": 100.0 * float(np.mean(iou_mean >= iou_threshold)),
    f"{prefix}/mean_iou": float(np.mean(iou)),
    f"{prefix}/count": float(pred.shape[0]),
  }
