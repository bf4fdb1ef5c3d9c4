"""Exact resume: a restored MixedBatch iterator replays the remaining stream bit for bit.

The state saved by a pipeline without workers is restored into fresh pipelines with and without
worker processes (the state does not depend on the worker count), across a finite epoch end, and
with skipped records on the way.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipelines import features as F
from data_pipelines import mixture
from test_data_mixture_fakes import ListSource, fake_make_example, make_records

SIZES = F.BatchSizes(image_res=16, patch_size=8, max_tokens=16, max_masks=4, image_batch=4,
                     region_batch=5, region_max_images=3, video_batch=2, frame_len=3)
PRE = F.PreprocConfig(image_res=16, patch_size=8, max_tokens=16, max_masks=4, max_regions=3)
FAULTS = {3: "corrupt_image", 8: "empty_caption"}


def _build(workers: dict[str, int], num_epochs=None) -> mixture.MixedBatchIterator:
  datasets = {}
  for kind in F.KINDS:
    sources = [ListSource(make_records(kind, 13, faults=FAULTS), bad_json=[5]),
               ListSource(make_records(kind, 6, start=200))]
    datasets[kind] = mixture.kind_dataset(
        kind, sources, SIZES, PRE, None, seed=7, weights=[2.0, 1.0],
        make_example=fake_make_example, num_epochs=num_epochs,
        num_workers=workers.get(kind, 0), worker_buffer_size=2)
  return mixture.MixedBatchIterator(datasets)


def _assert_same(a, b):
  assert len(a) == len(b)
  for step, (x, y) in enumerate(zip(a, b)):
    for kind in x:
      for name in x[kind]:
        np.testing.assert_array_equal(x[kind][name], y[kind][name], err_msg=f"{step} {kind}/{name}")


@pytest.fixture(scope="module")
def reference():
  """N = 4 batches consumed, state saved (through JSON), then M = 6 more."""
  it = _build({})
  for _ in range(4):
    F.check_batch(next(it), SIZES)
  state = json.loads(json.dumps(it.get_state()))
  skips = it.skip_counts()
  rest = [next(it) for _ in range(6)]
  it.close()
  return state, skips, rest


def test_resume_without_workers(reference):
  state, skips, rest = reference
  it = _build({})
  it.set_state(state)
  assert it.skip_counts() == skips  # counters travel with the state
  _assert_same(rest, [next(it) for _ in range(6)])
  it.close()


def test_resume_with_workers(reference):
  """Fresh pipeline with worker processes (2 for images, 1 for regions, none for videos)."""
  state, _, rest = reference
  with _build({F.IMAGE: 2, F.REGION: 1, F.VIDEO: 1}) as it:
    it.set_state(state)
    got = [next(it) for _ in range(6)]
    for b in got:
      F.check_batch(b, SIZES)
    _assert_same(rest, got)
    # Saving again after restore continues from the same point as the reference pipeline.
    again = json.loads(json.dumps(it.get_state()))
  it2 = _build({})
  it2.set_state(state)
  for _ in range(6):
    next(it2)
  assert again == it2.get_state()
  it2.close()


def test_resume_across_epoch_end():
  """Finite epoch: restore just before the end reproduces the padded last batch and the stop."""
  it = _build({}, num_epochs=1)
  full = list(it)
  state_mid = None
  it = _build({}, num_epochs=1)
  for _ in range(len(full) - 1):
    next(it)
  state_mid = it.get_state()
  it = _build({}, num_epochs=1)
  it.set_state(json.loads(json.dumps(state_mid)))
  _assert_same(full[-1:], list(it))
  assert it.skip_counts()[F.IMAGE]  # the faults of a whole pass were seen


def test_state_mismatch_is_rejected(reference):
  state, _, _ = reference
  sizes = F.BatchSizes(**{**SIZES.__dict__, "video_batch": 0})
  it = mixture.MixedBatchIterator({
      k: mixture.kind_dataset(k, [ListSource(make_records(k, 5))], sizes, PRE, None, seed=0,
                              make_example=fake_make_example)
      for k in (F.IMAGE, F.REGION)})
  with pytest.raises(ValueError, match="kinds"):
    it.set_state(state)


def test_resume_real_transforms_with_workers():
  """make_train_iterator on synthetic sources with the real make_example (crops, RandAugment,
  MLM masking): the restored stream, with an image worker process, is identical."""
  from data_pipelines.text_ops import Tokenizer  # pylint: disable=g-import-not-at-top
  from data_pipelines import assets  # pylint: disable=g-import-not-at-top

  sizes = F.BatchSizes(image_res=32, patch_size=16, max_tokens=16, max_masks=4, image_batch=3,
                       region_batch=4, region_max_images=2, video_batch=2, frame_len=3)
  pre = F.PreprocConfig(image_res=32, patch_size=16, max_tokens=16, max_masks=4, max_regions=3)
  tok = Tokenizer(assets.minilm_dir(), max_tokens=16)
  world = {"image_size": 40, "max_frames": 5}
  cfg = {F.IMAGE: [{"type": "synthetic", "size": 7, "world": world},
                   {"type": "synthetic", "size": 5, "seed": 9, "weight": 0.5, "world": world}],
         F.REGION: [{"type": "synthetic", "size": 6, "world": world}],
         F.VIDEO: [{"type": "synthetic", "size": 4, "world": world}]}
  it = mixture.make_train_iterator(cfg, sizes, pre, tok, seed=11, process_index=0, process_count=1)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = [next(it) for _ in range(3)]
  with mixture.make_train_iterator({**cfg, "num_workers": {F.IMAGE: 1}}, sizes, pre, tok, seed=11,
                                   process_index=0, process_count=1) as restored:
    restored.set_state(state)
    got = [next(restored) for _ in range(3)]
  for b in got:
    F.check_batch(b, sizes)
  _assert_same(rest, got)
