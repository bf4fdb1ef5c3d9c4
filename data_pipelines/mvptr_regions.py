"""MVPTR region vectors and the Oscar/VinVL feature-TSV row (docs/mvptr.md#data).

A region vector is the 2048-d detector feature followed by 6 box values (x1/W, y1/H, x2/W, y2/H,
(x2-x1)/W, (y2-y1)/H) -- MVPTR_REFERENCE.md section 1. The official reader
(`oscar/oscar_datasets_ml/oscar_tsv4.py::get_img_feature`) takes a feature-TSV row as tab
separated columns `image_id`, `num_boxes`, ..., base64 of float32[num_boxes x dim] (the last
column), so that is the row `encode_feature_row` writes and `decode_feature_row` reads. A bad
row raises `features.SkipRecord` naming the record and the field (the shared bad-record rules):
'bad_field_type' for a missing column or a non-integer box count, 'corrupt_image' for features
that are not base64 or do not hold num_boxes x dim float32 values.

The rest of the layout (corpus TSV, label files, scene-graph phrase file, offset maps) is read by
`mvptr_oscar.py` and written by `mvptr_oscar_write.py`.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from data_pipelines import features as F

BOX_VALUES = 6


def box_values(boxes_xyxy, width: float, height: float) -> np.ndarray:
  """[n, 4] pixel boxes (x1, y1, x2, y2) -> [n, 6] float32 MVPTR box values."""
  b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
  if width <= 0 or height <= 0:
    raise ValueError(f"image size must be positive, got {width} x {height}")
  x1, y1, x2, y2 = b[:, 0] / width, b[:, 1] / height, b[:, 2] / width, b[:, 3] / height
  return np.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], axis=1).astype(np.float32)


def region_vectors(features, boxes_xyxy, width: float, height: float) -> np.ndarray:
  """[n, F] detector features + [n, 4] boxes -> [n, F + 6] float32 region vectors."""
  feats = np.asarray(features, np.float32)
  boxes = box_values(boxes_xyxy, width, height)
  if feats.ndim != 2 or feats.shape[0] != boxes.shape[0]:
    raise ValueError(f"features {feats.shape} and {boxes.shape[0]} boxes do not match")
  return np.concatenate([feats, boxes], axis=1)


def encode_feature_row(image_id: str, vectors) -> str:
  """One feature-TSV line (no newline): image_id, num_boxes, base64 float32 values."""
  v = np.ascontiguousarray(np.asarray(vectors, np.float32))
  if "\t" in image_id or "\n" in image_id:
    raise ValueError(f"image id {image_id!r} contains a tab or newline")
  return f"{image_id}\t{v.shape[0]}\t{base64.b64encode(v.tobytes()).decode('ascii')}"


def decode_feature_row(line: str | bytes, dim: int, record_id: str) -> tuple[str, np.ndarray]:
  """A feature-TSV line -> (image_id, [num_boxes, dim] float32); `SkipRecord` if bad."""
  if isinstance(line, bytes):
    line = line.decode("utf-8", errors="replace")
  cols = line.rstrip("\r\n").split("\t")
  if len(cols) < 3:
    raise F.SkipRecord("bad_field_type", record_id, "num_boxes", f"{len(cols)} columns, need 3")
  try:
    n = int(cols[1])
  except ValueError:
    raise F.SkipRecord("bad_field_type", record_id, "num_boxes", repr(cols[1][:20])) from None
  try:
    raw = base64.b64decode(cols[-1], validate=True)
  except (binascii.Error, ValueError):
    raise F.SkipRecord("corrupt_image", record_id, "features", "not base64") from None
  if n < 0 or len(raw) != n * dim * 4:
    raise F.SkipRecord(
      "corrupt_image", record_id, "features", f"{len(raw)} bytes for {n} boxes x {dim} floats"
    )
  return cols[0], np.frombuffer(raw, np.float32).reshape(n, dim).copy()


def pad_regions(vectors, max_regions: int) -> tuple[np.ndarray, np.ndarray]:
  """[n, dim] -> ([max_regions, dim] zero-padded or cut to the first max_regions, [max_regions]
  int32 mask), as the official loader (at most `max_img_seq_length` regions, zeros after)."""
  v = np.asarray(vectors, np.float32)
  out = np.zeros((max_regions, v.shape[1]), np.float32)
  k = min(max_regions, v.shape[0])
  out[:k] = v[:k]
  mask = (np.arange(max_regions) < k).astype(np.int32)
  return out, mask
