"""MVPTR pre-training stream: batch fields and shapes, determinism, bit-identical resume from
get_state mid-epoch (JSON round trip), disjoint and covering process shards, skips counted."""

import json

import numpy as np
import pytest

from data_pipelines import features as F
from data_pipelines import mvptr_examples, mvptr_stream
from data_pipelines.mvptr_oscar import OscarSource
from tests import mvptr_data_testlib as T


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  specs = T.write_synthetic(tmp_path_factory.mktemp("mvptr_stream"), n_train=15, n_heldout=2)
  return OscarSource(specs["train"], T.tokenizer())  # 30 captions


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_batch_fields_and_determinism(source):
  it = mvptr_stream.pretrain_iterator(source, T.SPEC, 4, seed=3, process_index=0, process_count=1)
  batch = next(it)
  row = mvptr_examples.build_example(
    np.random.default_rng(0), [2000], [], [], np.zeros((1, 2054)), T.SPEC
  )
  assert set(batch) == set(row) | {"image_id"}
  for k, v in row.items():
    assert batch[k].shape == (4, *v.shape) and batch[k].dtype == v.dtype, k
  assert batch["image_id"].shape == (4,) and batch["image_id"].dtype == np.int64
  again = mvptr_stream.pretrain_iterator(source, T.SPEC, 4, 3, 0, 1)
  _equal(batch, next(again))
  other = next(mvptr_stream.pretrain_iterator(source, T.SPEC, 4, 4, 0, 1))
  assert not np.array_equal(other["text_ids"], batch["text_ids"])  # the seed matters
  it.close()


def test_resume_mid_epoch_is_bit_identical(source):
  it = mvptr_stream.pretrain_iterator(source, T.SPEC, 4, 7, 0, 1)
  _take(it, 3)  # 12 of 30 records: mid-epoch
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 6)  # crosses the epoch boundary (re-shuffled)
  resumed = mvptr_stream.pretrain_iterator(source, T.SPEC, 4, 7, 0, 1)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 6)):
    _equal(a, b)
  with pytest.raises(ValueError, match="state is for"):
    mvptr_stream.pretrain_iterator(source, T.SPEC, 4, 8, 0, 1).set_state(state)


def test_worker_processes_give_the_same_batches_and_state(source):
  threads = mvptr_stream.pretrain_iterator(source, T.SPEC, 4, 2, 0, 1)
  expected = _take(threads, 4)
  with mvptr_stream.pretrain_iterator(source, T.SPEC, 4, 2, 0, 1, num_workers=1) as procs:
    for a, b in zip(expected[:2], _take(procs, 2)):
      _equal(a, b)
    state = procs.get_state()
  assert state == {**threads.get_state(), "position": 8, "batch_index": 2}
  resumed = mvptr_stream.pretrain_iterator(source, T.SPEC, 4, 2, 0, 1)
  resumed.set_state(state)
  for a, b in zip(expected[2:], _take(resumed, 2)):
    _equal(a, b)


class _Records:
  """Record i has image_id i; the indices in `bad` raise SkipRecord (a reader fault)."""

  def __init__(self, n, bad=()):
    self.n, self.bad = n, set(bad)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i in self.bad:
      raise F.SkipRecord("missing_image", f"corpus.tsv:{i + 1}", "image_feature", "not there")
    regions = np.full((2, 2054), i, np.float32)
    return dict(words=[2000 + i], phrases=[], tags=[], regions=regions, image_id=np.int64(i))


@pytest.mark.parametrize("count", [1, 3, 4])
def test_process_shards_are_disjoint_and_cover(count):
  shards = []
  for p in range(count):
    it = mvptr_stream.pretrain_iterator(_Records(12), T.SPEC, 1, 5, p, count, num_epochs=1)
    shards.append([int(b["image_id"][0]) for b in it])
  assert sorted(sum(shards, [])) == list(range(12))  # covering, and no record twice
  assert all(len(s) == 12 // count for s in shards)


def test_skipped_records_are_counted_and_logged(caplog):
  it = mvptr_stream.pretrain_iterator(
    _Records(10, bad={2, 5}), T.SPEC, 3, 0, 0, 1, num_epochs=1, shuffle=False
  )
  ids = [i for b in it for i in b["image_id"].tolist()]
  assert ids == [0, 1, 3, 4, 6, 7]  # 8 good records: two batches, the partial dropped
  assert it.skip_counts() == {"missing_image": 2}
  assert it.get_state()["skips"] == {"missing_image": 2}
  assert "corpus.tsv:3: missing_image in field 'image_feature'" in caplog.text


def test_heldout_arrays_are_unmasked_and_ordered():
  arrays, skips = mvptr_stream.heldout_arrays(_Records(6, bad={4}), T.SPEC)
  assert skips == {"missing_image": 1} and arrays["index"].tolist() == [0, 1, 2, 3, 5]
  assert arrays["image_id"].tolist() == [0, 1, 2, 3, 5]
  assert (arrays["text_labels"] == -1).all() and (arrays["tag_labels"] == -1).all()
  assert arrays["text_ids"][:, 1].tolist() == [2000, 2001, 2002, 2003, 2005]  # never masked
