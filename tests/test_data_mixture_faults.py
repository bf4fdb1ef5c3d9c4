"""Skip counting end to end: JSON-lines with injected faults → real readers and make_example.

One full epoch per kind through `make_train_iterator` must drop exactly the injected records and
report exactly the injected count per skip reason, without crashing.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest

from data_pipelines import assets, mixture, synthetic
from data_pipelines import features as F
from data_pipelines.testing import faults
from data_pipelines.text_ops import Tokenizer

L = 16
SIZES = F.BatchSizes(
  image_res=32,
  patch_size=16,
  max_tokens=L,
  max_masks=4,
  image_batch=4,
  region_batch=6,
  region_max_images=3,
  video_batch=2,
  frame_len=3,
)
PRE = F.PreprocConfig(
  image_res=32, patch_size=16, max_tokens=L, max_masks=4, max_regions=3, frame_len=3
)
N = {F.IMAGE: 30, F.REGION: 30, F.VIDEO: 21}


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(assets.minilm_dir(), max_tokens=L)


@pytest.mark.parametrize("kind", F.KINDS)
def test_one_epoch_counts_injected_faults_exactly(kind, tokenizer, tmp_path):
  world = synthetic.ShapesWorld(synthetic.WorldConfig(image_size=40, max_frames=5))
  clean, bad = tmp_path / "clean", tmp_path / "bad"
  synthetic.write_jsonl(world, kind, N[kind], clean, n_files=2)
  reasons = tuple(faults.applicable_reasons(kind))
  injected = faults.inject_faults(clean, bad, kind, fraction=0.3, seed=1, reasons=reasons)
  expected = collections.Counter(f.reason for f in injected)
  assert set(expected) == set(reasons)  # every reason is exercised

  only = dataclasses.replace(SIZES, **{a: 0 for k, a in mixture._BATCH_ATTR.items() if k != kind})
  data_cfg = {kind: [{"type": "jsonl", "path": str(bad)}], "num_epochs": 1}
  it = mixture.make_train_iterator(
    data_cfg, only, PRE, tokenizer, seed=0, process_index=0, process_count=1
  )
  rows = 0
  for batch in it:
    F.check_batch(batch, only)
    rows += int(batch[kind][F.IMAGE_VALID if kind == F.REGION else F.VALID].sum())
  assert it.skip_counts() == {kind: dict(expected)}
  assert rows == N[kind] - len(injected)  # every clean record made it into a batch
