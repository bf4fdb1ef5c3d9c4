"""Small stand-ins shared by the data-mixture tests: a list-backed source and a cheap make_example.

They let the pipeline tests run in milliseconds per example and make every output traceable to
its record: pixel (0, 0, 0) holds record_index % 251, text_ids[1] holds the record index + 1000,
so tests can check which record landed in which row. Faults are injected per record
('fault': reason raised by make_example) or per index (the source raises 'bad_json').
"""

from __future__ import annotations

import numpy as np

from data_pipelines import features as F

TAG_OFFSET = 1000  # text_ids[:, 1] = record number + TAG_OFFSET


class ListSource:
  """Random-access source over a list of canonical-ish records; some indices fail to parse."""

  def __init__(self, records, bad_json=()):
    self.records, self.bad_json = list(records), set(bad_json)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    i = int(i)
    if i in self.bad_json:
      raise F.SkipRecord("bad_json", f"list:{i}", "<line>", "injected")
    return self.records[i]


def make_records(kind, n, faults=None, start=0, n_texts=None):
  """n records of `kind`; faults maps record index -> skip reason raised by make_example."""
  faults = faults or {}
  out = []
  for i in range(n):
    rec = {"kind": kind, "id": f"{kind}-{start + i}", "num": start + i}
    if i in faults:
      rec["fault"] = faults[i]
    if kind == F.REGION:
      rec["n_texts"] = n_texts[i] if n_texts is not None else 1 + i % 3
    out.append(rec)
  return out


def fake_make_example(kind, record, rng, cfg, tokenizer):
  """Per-kind example with the shapes examples.make_example documents; randomness from rng."""
  del tokenizer
  if "fault" in record:
    raise F.SkipRecord(record["fault"], record["id"], "injected")
  r, L, M = cfg.image_res, cfg.max_tokens, cfg.max_masks
  t = (cfg.image_res // cfg.patch_size) ** 2
  num = record.get("num", 0)  # records of other sources (e.g. synthetic) carry no tag

  def text(n=None):
    shape = () if n is None else (n,)
    ids = rng.integers(1, 500, size=shape + (L,)).astype(np.int32)
    ids[..., 1] = num + TAG_OFFSET
    return {
      F.TEXT_IDS: ids,
      F.TEXT_MASK: np.ones(shape + (L,), np.int32),
      F.MLM_IDS: ids.copy(),
      F.MLM_POSITIONS: rng.integers(0, L, size=shape + (M,)).astype(np.int32),
      F.MLM_LABELS: rng.integers(0, 500, size=shape + (M,)).astype(np.int32),
      F.MLM_WEIGHTS: np.ones(shape + (M,), np.float32),
    }

  def image():
    img = rng.integers(0, 256, size=(r, r, 3), dtype=np.uint8)
    img[0, 0, 0] = num % 251
    return img

  if kind == F.IMAGE:
    return {F.PIXELS: image(), **text()}
  if kind == F.VIDEO:
    f = cfg.frame_len
    return {
      F.FRAMES: np.stack([image() for _ in range(f)]),
      F.FRAME_VALID: np.ones(f, np.int32),
      **text(),
    }
  n = record.get("n_texts", 1)
  box = rng.uniform(0, 1, size=(n, 4)).astype(np.float32)
  return {
    F.PIXELS: image(),
    **text(n),
    F.BOX: box,
    F.PATCH_MASK: rng.integers(0, 2, size=(n, t)).astype(np.int32),
    F.IS_IMAGE: (np.arange(n) == 0).astype(np.int32),
  }
