"""Exact resume: a restored per-kind iterator replays the remaining stream bit for bit.

For every kind, the state saved by a pipeline without workers is restored into fresh pipelines
with and without worker processes (the state does not depend on the worker count), across a
finite epoch end, and with skipped records on the way.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_data_mixture_fakes import ListSource, fake_make_example, make_records

from data_pipelines import features as F
from data_pipelines import mixture

SIZES = F.BatchSizes(
  image_res=16,
  patch_size=8,
  max_tokens=16,
  max_masks=4,
  image_batch=4,
  region_batch=5,
  region_max_images=3,
  video_batch=2,
  frame_len=3,
)
PRE = F.PreprocConfig(image_res=16, patch_size=8, max_tokens=16, max_masks=4, max_regions=3)
FAULTS = {3: "corrupt_image", 8: "empty_caption"}
WORKERS = {F.IMAGE: 2, F.REGION: 1, F.VIDEO: 1}  # worker processes of the restored pipelines


def _only(sizes: F.BatchSizes, kind: str) -> F.BatchSizes:
  """`sizes` with every other kind's batch set to 0."""
  zero = {a: 0 for k, a in mixture._BATCH_ATTR.items() if k != kind}
  if kind != F.REGION:
    zero["region_max_images"] = 0
  return dataclasses.replace(sizes, **zero)


def _build(kind: str, workers: int = 0, num_epochs=None) -> mixture.MixedBatchIterator:
  sources = [
    ListSource(make_records(kind, 13, faults=FAULTS), bad_json=[5]),
    ListSource(make_records(kind, 6, start=200)),
  ]
  return mixture.MixedBatchIterator(
    mixture.kind_dataset(
      kind,
      sources,
      _only(SIZES, kind),
      PRE,
      None,
      seed=7,
      weights=[2.0, 1.0],
      make_example=fake_make_example,
      num_epochs=num_epochs,
      num_workers=workers,
      worker_buffer_size=2,
    )
  )


def _assert_same(a, b):
  assert len(a) == len(b)
  for step, (x, y) in enumerate(zip(a, b)):
    assert set(x) == set(y)
    for kind in x:
      for name in x[kind]:
        np.testing.assert_array_equal(x[kind][name], y[kind][name], err_msg=f"{step} {kind}/{name}")


@pytest.fixture(scope="module")
def reference():
  """Per kind: N = 4 batches consumed, state saved (through JSON), then M = 6 more."""
  out = {}
  for kind in F.KINDS:
    it = _build(kind)
    for _ in range(4):
      F.check_batch(next(it), _only(SIZES, kind))
    state = json.loads(json.dumps(it.get_state()))
    skips = it.skip_counts()
    rest = [next(it) for _ in range(6)]
    it.close()
    out[kind] = (state, skips, rest)
  return out


@pytest.mark.parametrize("kind", F.KINDS)
def test_resume_without_workers(reference, kind):
  state, skips, rest = reference[kind]
  it = _build(kind)
  it.set_state(state)
  assert it.skip_counts() == skips  # counters travel with the state
  _assert_same(rest, [next(it) for _ in range(6)])
  it.close()


@pytest.mark.parametrize("kind", F.KINDS)
def test_resume_with_workers(reference, kind):
  """Fresh pipeline with worker processes (2 for images, 1 for regions and videos)."""
  state, _, rest = reference[kind]
  with _build(kind, WORKERS[kind]) as it:
    it.set_state(state)
    got = [next(it) for _ in range(6)]
    for b in got:
      F.check_batch(b, _only(SIZES, kind))
    _assert_same(rest, got)
    # Saving again after restore continues from the same point as the reference pipeline.
    again = json.loads(json.dumps(it.get_state()))
  it2 = _build(kind)
  it2.set_state(state)
  for _ in range(6):
    next(it2)
  assert again == it2.get_state()
  it2.close()


@pytest.mark.parametrize("kind", F.KINDS)
def test_resume_across_epoch_end(kind):
  """Finite epoch: restore just before the end reproduces the padded last batch and the stop."""
  full = list(_build(kind, num_epochs=1))
  it = _build(kind, num_epochs=1)
  for _ in range(len(full) - 1):
    next(it)
  state_mid = it.get_state()
  it = _build(kind, num_epochs=1)
  it.set_state(json.loads(json.dumps(state_mid)))
  _assert_same(full[-1:], list(it))
  assert it.skip_counts()[kind]  # the faults of a whole pass were seen


def test_state_mismatch_is_rejected(reference):
  state, _, _ = reference[F.REGION]
  it = _build(F.IMAGE)
  with pytest.raises(ValueError, match="kinds"):
    it.set_state(state)
  bad = {F.IMAGE: {**reference[F.IMAGE][0][F.IMAGE], "version": 0}}
  with pytest.raises(ValueError, match="version"):
    it.set_state(bad)


@pytest.mark.parametrize("kind", F.KINDS)
def test_resume_real_transforms_with_workers(kind):
  """make_train_iterator on synthetic sources with the real make_example (crops, RandAugment,
  MLM masking): the restored stream, with a worker process for images, is identical."""
  from data_pipelines import assets  # pylint: disable=g-import-not-at-top
  from data_pipelines.text_ops import Tokenizer  # pylint: disable=g-import-not-at-top

  sizes = _only(
    F.BatchSizes(
      image_res=32,
      patch_size=16,
      max_tokens=16,
      max_masks=4,
      image_batch=3,
      region_batch=4,
      region_max_images=2,
      video_batch=2,
      frame_len=3,
    ),
    kind,
  )
  pre = F.PreprocConfig(image_res=32, patch_size=16, max_tokens=16, max_masks=4, max_regions=3)
  tok = Tokenizer(assets.minilm_dir(), max_tokens=16)
  world = {"image_size": 40, "max_frames": 5}
  cfg = {
    F.IMAGE: [
      {"type": "synthetic", "size": 7, "world": world},
      {"type": "synthetic", "size": 5, "seed": 9, "weight": 0.5, "world": world},
    ],
    F.REGION: [{"type": "synthetic", "size": 6, "world": world}],
    F.VIDEO: [{"type": "synthetic", "size": 4, "world": world}],
  }
  cfg = {kind: cfg[kind]}
  it = mixture.make_train_iterator(cfg, sizes, pre, tok, seed=11, process_index=0, process_count=1)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = [next(it) for _ in range(3)]
  with mixture.make_train_iterator(
    {**cfg, "num_workers": {F.IMAGE: 1}}, sizes, pre, tok, seed=11, process_index=0, process_count=1
  ) as restored:
    restored.set_state(state)
    got = [next(restored) for _ in range(3)]
  for b in got:
    F.check_batch(b, sizes)
  _assert_same(rest, got)
