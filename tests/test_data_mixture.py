"""Per-kind grain pipelines and their iterator: shapes, padding, packing, skips, mixing, shards."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_data_mixture_fakes import TAG_OFFSET, ListSource, fake_make_example, make_records

from data_pipelines import features as F
from data_pipelines import mixture, packing

SIZES = F.BatchSizes(
  image_res=16,
  patch_size=8,
  max_tokens=16,
  max_masks=4,
  image_batch=4,
  region_batch=6,
  region_max_images=3,
  video_batch=2,
  frame_len=3,
)
PRE = F.PreprocConfig(image_res=16, patch_size=8, max_tokens=16, max_masks=4, max_regions=3)


def _kind(kind, sources, **kw):
  kw.setdefault("seed", 0)
  return mixture.kind_dataset(kind, sources, SIZES, PRE, None, make_example=fake_make_example, **kw)


def _record_nums(batch):
  """Record numbers of the valid text rows, from the tag the fake writes into text_ids."""
  valid = batch[F.VALID] == 1
  return list(batch[F.TEXT_IDS][valid, 1] - TAG_OFFSET)


def test_finite_epoch_shapes_and_padding_every_step():
  """One epoch of 11 / 10 / 5 records: every step matches batch_spec; the last one is padded."""
  its = {
    F.IMAGE: _kind(F.IMAGE, [ListSource(make_records(F.IMAGE, 11))], num_epochs=1),
    F.REGION: _kind(F.REGION, [ListSource(make_records(F.REGION, 10))], num_epochs=1),
    F.VIDEO: _kind(F.VIDEO, [ListSource(make_records(F.VIDEO, 5))], num_epochs=1),
  }
  steps = {}
  for kind, ds in its.items():
    batches = list(ds)
    steps[kind] = batches
    only = dataclasses.replace(SIZES, **{a: 0 for k, a in mixture._BATCH_ATTR.items() if k != kind})
    for b in batches:
      F.check_batch({kind: b}, only)
  img = steps[F.IMAGE]
  assert len(img) == 3 and [int(b[F.VALID].sum()) for b in img] == [4, 4, 3]
  last = img[-1]
  assert last[F.RECORD_ID][3] == -1 and last[F.SOURCE_ID][3] == -1
  assert not last[F.PIXELS][3].any() and not last[F.TEXT_IDS][3].any()
  assert sorted(n for b in img for n in _record_nums(b)) == list(range(11))
  vid = steps[F.VIDEO]
  assert [int(b[F.VALID].sum()) for b in vid] == [2, 2, 1]
  assert not vid[-1][F.FRAMES][1].any() and not vid[-1][F.FRAME_VALID][1].any()
  reg = steps[F.REGION]
  assert len(reg) == 4  # 10 images in loader batches of 3
  assert list(reg[-1][F.IMAGE_VALID]) == [1, 0, 0]
  # The last partial loader batch keeps its texts once and pads the rest with valid = 0.
  (num,) = set(_record_nums(reg[-1]))
  assert int(reg[-1][F.VALID].sum()) == 1 + num % 3


def _factory(kind, spec):
  return ListSource(make_records(kind, spec["n"]))


def test_train_iterator_streams_one_kind():
  """A training iterator yields {kind: sub-batch} as batch_spec; several kinds are refused."""
  sizes = dataclasses.replace(SIZES, image_batch=0, video_batch=0)
  cfg = {F.REGION: [{"n": 9}], F.IMAGE: [{"n": 9}]}  # image sources unused: image_batch is 0
  with mixture.make_train_iterator(
    cfg,
    sizes,
    PRE,
    None,
    seed=1,
    process_index=0,
    process_count=1,
    make_example=fake_make_example,
    source_factory=_factory,
  ) as it:
    for _ in range(5):  # repeats forever: past the 9 records of one epoch
      batch = next(it)
      F.check_batch(batch, sizes)
      assert batch[F.REGION][F.VALID].all()
    state = it.get_state()
    assert list(state) == [F.REGION] and state[F.REGION]["version"] == mixture.STATE_VERSION
    json.dumps(state)  # JSON-serialisable as is
  with pytest.raises(ValueError, match="one kind"):
    mixture.make_train_iterator(
      cfg,
      dataclasses.replace(sizes, image_batch=4),
      PRE,
      None,
      seed=1,
      process_index=0,
      process_count=1,
      make_example=fake_make_example,
      source_factory=_factory,
    )


def test_region_packing_indices_and_duplicates():
  """Texts map to their image slot; few texts are padded with duplicates (official collate)."""
  recs = make_records(F.REGION, 6, n_texts=[1, 1, 1, 3, 3, 3])
  batches = list(_kind(F.REGION, [ListSource(recs)], num_epochs=1, shuffle=False))
  assert len(batches) == 2
  few, many = batches  # 3 texts for 6 rows; 9 texts for 6 rows
  for b in batches:
    nums = _record_nums(b)
    # Every text row carries the record of the image slot it points to.
    slot_nums = b[F.PIXELS][b[F.IMAGE_INDEX], 0, 0, 0]
    assert list(slot_nums) == [n % 251 for n in nums]
    assert list(b[F.RECORD_ID]) == nums
  assert few[F.VALID].all() and sorted(set(_record_nums(few))) == [0, 1, 2]
  assert sorted(_record_nums(few)[:3]) == [0, 1, 2]  # all originals, then 3 duplicates
  assert many[F.VALID].all()
  # Sampling without replacement: each (record, text) at most once.
  keys = [(int(r), int(m)) for r, m in zip(many[F.RECORD_ID], many[F.TEXT_IDS][:, 2])]
  assert len(set(keys)) == 6


def test_region_text_selection_rules():
  rng = np.random.default_rng(0)
  sel = packing.region_text_selection(10, 4, rng, full=True)  # enough texts: sample
  assert len(sel) == 4 and len(set(sel)) == 4 and set(sel) <= set(range(10))
  draws = {tuple(packing.region_text_selection(10, 4, rng, full=True)) for _ in range(5)}
  assert len(draws) > 1  # a random sample, not always the first texts
  sel = packing.region_text_selection(2, 7, rng, full=True)  # repeated expansion
  assert len(sel) == 7 and list(sel[:2]) == [0, 1] and set(sel) == {0, 1}
  assert list(packing.region_text_selection(2, 7, rng, full=False)) == [0, 1]


def test_skip_counts_per_reason_exact():
  """A full epoch with injected faults: counts per reason equal the injected ones, no crash."""
  faults = {
    1: "corrupt_image",
    4: "empty_caption",
    5: "corrupt_image",
    9: "bad_box",
    12: "caption_no_tokens",
  }
  src = ListSource(make_records(F.IMAGE, 17, faults=faults), bad_json=[2, 14])
  it = iter(_kind(F.IMAGE, [src], num_epochs=1))
  rows = [n for b in it for n in _record_nums(b)]
  assert it.skip_counts() == {
    "corrupt_image": 2,
    "empty_caption": 1,
    "bad_box": 1,
    "caption_no_tokens": 1,
    "bad_json": 2,
  }
  assert sorted(rows) == sorted(set(range(17)) - set(faults) - {2, 14})


def test_mixture_weights_and_source_ids():
  a = ListSource(make_records(F.IMAGE, 50))
  b = ListSource(make_records(F.IMAGE, 50, start=500))
  it = iter(_kind(F.IMAGE, [a, b], weights=[3.0, 1.0]))
  src = np.concatenate([next(it)[F.SOURCE_ID] for _ in range(10)])
  assert set(src) == {0, 1} and abs((src == 0).mean() - 0.75) < 0.1


def test_per_example_randomness_is_seeded():
  recs = [ListSource(make_records(F.IMAGE, 8))]
  one = next(iter(_kind(F.IMAGE, recs, seed=3)))
  two = next(iter(_kind(F.IMAGE, recs, seed=3)))
  other = next(iter(_kind(F.IMAGE, recs, seed=4)))
  assert all(np.array_equal(one[k], two[k]) for k in one)
  assert not np.array_equal(one[F.PIXELS], other[F.PIXELS])


def test_bad_example_names_record_and_field():
  def broken(kind, record, rng, cfg, tok):
    ex = fake_make_example(kind, record, rng, cfg, tok)
    ex[F.TEXT_IDS] = ex[F.TEXT_IDS][:5]
    return ex

  ds = mixture.kind_dataset(
    F.IMAGE, [ListSource(make_records(F.IMAGE, 4))], SIZES, PRE, None, seed=0, make_example=broken
  )
  with pytest.raises(ValueError, match=r"image source 0 record \d+: field 'text_ids' has shape"):
    next(iter(ds))


def test_host_shards_are_disjoint_and_cover_the_source():
  """One epoch on each of 3 hosts: every record is read by exactly one host."""
  sizes = dataclasses.replace(SIZES, region_batch=0, region_max_images=0, video_batch=0)
  seen = []
  for host in range(3):
    it = mixture.make_train_iterator(
      {F.IMAGE: [{"n": 13}], "num_epochs": 1},
      sizes,
      PRE,
      None,
      seed=2,
      process_index=host,
      process_count=3,
      make_example=fake_make_example,
      source_factory=_factory,
    )
    nums = [n for b in it for n in _record_nums(b[F.IMAGE])]
    assert len(nums) == len(range(host, 13, 3))  # strided shard [host::3]
    seen += nums
  assert sorted(seen) == list(range(13))


def test_global_batch_shapes_shardings_and_host_fields():
  import jax  # pylint: disable=g-import-not-at-top

  from x2vlm_jax import global_batch, sharding

  sizes = dataclasses.replace(
    SIZES, image_batch=8, region_batch=8, region_max_images=4, video_batch=0
  )
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ds = {
    k: mixture.kind_dataset(
      k, [ListSource(make_records(k, 9))], sizes, PRE, None, seed=0, make_example=fake_make_example
    )
    for k in (F.IMAGE, F.REGION)
  }
  local = {k: next(iter(d)) for k, d in ds.items()}
  out = global_batch.put([local], mesh)
  spec = F.batch_spec(sizes)
  for kind, fields in spec.items():
    assert set(out[kind]) == set(fields) - set(F.HOST_ONLY_FIELDS)
    for name, arr in out[kind].items():
      assert arr.shape == fields[name][0] and arr.dtype == fields[name][1], (kind, name)
      assert arr.sharding.spec[0] == ("data", "fsdp")
      np.testing.assert_array_equal(np.asarray(arr), local[kind][name])  # one process: offset 0
  bad = {F.IMAGE: {F.VALID: np.ones(3, np.int32)}}
  with pytest.raises(ValueError, match="image/valid"):
    global_batch.put([bad], mesh)
  # Two micro-batches (gradient accumulation): stacked [2, B, ...], the batch axis (1) sharded.
  second = {k: next(iter(d)) for k, d in ds.items()}
  acc = global_batch.put([local, second], mesh)
  for kind, fields in spec.items():
    for name, arr in acc[kind].items():
      assert arr.shape == (2,) + fields[name][0], (kind, name)
      assert arr.sharding.spec[1] == ("data", "fsdp") and arr.sharding.spec[0] is None
      np.testing.assert_array_equal(np.asarray(arr[1]), second[kind][name])
  assert jax.device_count() == 8
