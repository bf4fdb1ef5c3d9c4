"""The image_id batch field: stable hash, fallback to the record id, padding, shared ids."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
from test_data_mixture_fakes import ListSource, fake_make_example, make_records

from data_pipelines import features as F
from data_pipelines import jsonl_format, mixture
from data_pipelines.testing import random_batch

SIZES = F.BatchSizes(
  image_res=16, patch_size=8, max_tokens=16, max_masks=4, image_batch=4, video_batch=3
)
PRE = F.PreprocConfig(image_res=16, patch_size=8, max_tokens=16, max_masks=4)


def _only(kind):
  other = {F.IMAGE: "video_batch", F.VIDEO: "image_batch"}[kind]
  return dataclasses.replace(SIZES, **{other: 0})


def test_hash_is_stable_31_bit_crc32():
  # Pinned values: the hash is part of the data contract (ids must not change between runs).
  assert F.image_id_hash("391895") == zlib.crc32(b"391895") & 0x7FFFFFFF == 633695266
  assert F.image_id_hash("vid-ü") == zlib.crc32("vid-ü".encode()) & 0x7FFFFFFF
  values = [F.image_id_hash(f"img{i}") for i in range(1000)]
  assert all(0 <= v < 2**31 for v in values) and len(set(values)) == 1000
  assert F.record_image_id({"id": "a:1", "image_id": "7"}) == F.image_id_hash("7")
  assert F.record_image_id({"id": "a:1"}) == F.image_id_hash("a:1")


@pytest.mark.parametrize("kind", [F.IMAGE, F.VIDEO])
def test_batch_image_ids_shared_fallback_and_padding(kind):
  records = make_records(kind, 5)
  for rec, image_id in zip(records, ["img-a", "img-b", "img-a", None, "img-b"]):
    if image_id is not None:
      rec["image_id"] = image_id
  ds = mixture.kind_dataset(
    kind,
    [ListSource(records)],
    _only(kind),
    PRE,
    None,
    seed=0,
    make_example=fake_make_example,
    num_epochs=1,
    shuffle=False,
  )
  batches = [b for b in mixture.MixedBatchIterator(ds)]
  ids = np.concatenate([b[kind][F.IMAGE_ID] for b in batches])
  valid = np.concatenate([b[kind][F.VALID] for b in batches])
  a, b = F.image_id_hash("img-a"), F.image_id_hash("img-b")
  expected = [a, b, a, F.image_id_hash(f"{kind}-3"), b]
  assert ids[valid == 1].tolist() == expected
  assert (ids[valid == 0] == -1).all() and (valid == 0).sum() > 0
  for batch in batches:
    F.check_batch(batch, _only(kind))  # the field is present, int32 [B]
    assert batch[kind][F.IMAGE_ID].dtype == np.int32
  assert F.IMAGE_ID not in F.HOST_ONLY_FIELDS  # a model input


def test_region_kind_has_no_image_id_and_random_batch_matches_spec():
  sizes = F.BatchSizes(
    image_res=16, patch_size=8, image_batch=2, region_batch=3, region_max_images=2, video_batch=2
  )
  assert F.IMAGE_ID not in F.batch_spec(sizes)[F.REGION]
  batch = random_batch.random_batch(sizes, num_invalid=1)
  F.check_batch(batch, sizes)
  for kind in (F.IMAGE, F.VIDEO):
    assert batch[kind][F.IMAGE_ID][-1] == -1
    assert len(set(batch[kind][F.IMAGE_ID].tolist())) == 2


def test_jsonl_image_id_key_parsed_and_written(tmp_path):
  fmt = jsonl_format.default_format(F.IMAGE, image_id_key="image_id")
  rec = {"kind": F.IMAGE, "id": "x", "image": b"\x89PNG", "captions": ["a"], "image_id": "42"}
  line = jsonl_format.to_line(rec, fmt, extra={"id": "x"})
  assert jsonl_format.parse_line(F.IMAGE, line, "f:1", fmt) == rec
  for bad in ("true", '""', "[1]", "null", "1.5"):
    line = f'{{"binary": "iVBO", "desc": "a", "image_id": {bad}}}'
    with pytest.raises(F.SkipRecord) as e:
      jsonl_format.parse_line(F.IMAGE, line, "f:2", fmt)
    assert (e.value.reason, e.value.field) == ("bad_field_type", "image_id")
  # Without image_id_key the key is ignored (the pre-training formats have none).
  plain = jsonl_format.parse_line(F.IMAGE, '{"binary": "iVBO", "desc": "a", "image_id": 3}', "f:3")
  assert "image_id" not in plain
