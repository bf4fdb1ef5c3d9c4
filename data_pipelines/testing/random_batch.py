"""Random MixedBatches with the exact spec of `features.batch_spec`, for tests and benchmarks.

Values are plausible rather than meaningful: real tokens then padding, MLM positions inside the
caption, boxes inside the image with the patch rectangle that the data pipeline would give.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import features as F


def _text(rng, b, sizes: F.BatchSizes, vocab: int):
  L, M = sizes.max_tokens, sizes.max_masks
  lengths = rng.integers(4, L + 1, size=b)
  ids = rng.integers(1000, vocab, size=(b, L)).astype(np.int32)
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  ids[:, 0] = 101
  ids[np.arange(b), lengths - 1] = 102
  ids *= mask
  pos = np.zeros((b, M), np.int32)
  labels = np.zeros((b, M), np.int32)
  weights = np.zeros((b, M), np.float32)
  mlm = ids.copy()
  for i in range(b):
    n = min(M, max(1, int(round(lengths[i] * 0.5))))
    p = np.sort(rng.choice(np.arange(1, lengths[i]), size=min(n, lengths[i] - 1), replace=False))
    pos[i, : len(p)], labels[i, : len(p)], weights[i, : len(p)] = p, ids[i, p], 1.0
    mlm[i, p] = 103
  return {
    F.TEXT_IDS: ids,
    F.TEXT_MASK: mask,
    F.MLM_IDS: mlm,
    F.MLM_POSITIONS: pos,
    F.MLM_LABELS: labels,
    F.MLM_WEIGHTS: weights,
    F.VALID: np.ones((b,), np.int32),
    F.RECORD_ID: np.arange(b, dtype=np.int32),
    F.SOURCE_ID: np.zeros((b,), np.int32),
  }


def _image_ids(b: int) -> np.ndarray:
  """Distinct image ids (one image per row), drawn without the rng so the other fields keep
  their values."""
  return np.asarray([F.image_id_hash(f"random-{i}") for i in range(b)], np.int32)


def random_batch(
  sizes: F.BatchSizes, vocab: int = 30522, seed: int = 0, num_invalid: int = 0
) -> dict:
  """A MixedBatch of random content; the last `num_invalid` rows of every kind are padding."""
  rng = np.random.default_rng(seed)
  R, P = sizes.image_res, sizes.image_res // sizes.patch_size
  out = {}
  if sizes.image_batch:
    out[F.IMAGE] = {
      F.PIXELS: rng.integers(0, 256, (sizes.image_batch, R, R, 3), dtype=np.uint8),
      F.IMAGE_ID: _image_ids(sizes.image_batch),
      **_text(rng, sizes.image_batch, sizes, vocab),
    }
  if sizes.region_batch:
    b, n = sizes.region_batch, sizes.region_max_images
    wh = rng.uniform(0.1, 0.9, size=(b, 2))
    c = wh / 2 + rng.uniform(0, 1, size=(b, 2)) * (1 - wh)
    box = np.concatenate([c, wh], axis=1).astype(np.float32)
    is_image = (rng.uniform(size=b) < 0.2).astype(np.int32)
    box[is_image == 1] = (0.5, 0.5, 1.0, 1.0)
    patch = np.zeros((b, P * P), np.int32)
    for i in range(b):
      x0, y0 = (box[i, :2] - box[i, 2:] / 2) * R
      x1, y1 = (box[i, :2] + box[i, 2:] / 2) * R
      cx0 = min(int(x0 // sizes.patch_size), P - 1)
      cx1 = max(cx0 + 1, min(int(np.ceil(x1 / sizes.patch_size)), P))
      cy0 = min(int(y0 // sizes.patch_size), P - 1)
      cy1 = max(cy0 + 1, min(int(np.ceil(y1 / sizes.patch_size)), P))
      grid = np.zeros((P, P), np.int32)
      grid[cy0:cy1, cx0:cx1] = 1
      patch[i] = 1 if is_image[i] else grid.reshape(-1)
    out[F.REGION] = {
      F.PIXELS: rng.integers(0, 256, (n, R, R, 3), dtype=np.uint8),
      F.IMAGE_VALID: np.ones((n,), np.int32),
      F.IMAGE_INDEX: rng.integers(0, n, size=b).astype(np.int32),
      F.BOX: box,
      F.PATCH_MASK: patch,
      F.IS_IMAGE: is_image,
      **_text(rng, b, sizes, vocab),
    }
  if sizes.video_batch:
    b, f = sizes.video_batch, sizes.frame_len
    out[F.VIDEO] = {
      F.FRAMES: rng.integers(0, 256, (b, f, R, R, 3), dtype=np.uint8),
      F.FRAME_VALID: np.ones((b, f), np.int32),
      F.IMAGE_ID: _image_ids(b),
      **_text(rng, b, sizes, vocab),
    }
  if num_invalid:
    for kind, fields in out.items():
      fields[F.VALID][-num_invalid:] = 0
      fields[F.RECORD_ID][-num_invalid:] = -1
      fields[F.SOURCE_ID][-num_invalid:] = -1
      if F.IMAGE_ID in fields:
        fields[F.IMAGE_ID][-num_invalid:] = -1
  return out
