"""Frame sampling and clip selection.

The official rules: docs/fidelity.md#frame-sampling, docs/fidelity.md#clip-selection.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from data_pipelines.features import SkipRecord
from data_pipelines.video_ops import sample_frame_ids, select_clip


@pytest.mark.parametrize(
  "nf,f,expect",
  [
    (1, 3, [0, 0, 0]),
    (2, 3, [0, 1, 0]),  # i mod nf
    (3, 3, [0, 1, 2]),
    (9, 3, [0, 3, 6]),
    (10, 3, [0, 4, 7]),  # leftover frame lengthens the first segment
    (11, 3, [0, 4, 8]),
    (7, 5, [0, 2, 4, 5, 6]),  # segments [2, 2, 1, 1, 1]
  ],
)
def test_eval_sampling(nf, f, expect):
  assert sample_frame_ids(nf, f, False, np.random.default_rng(0)) == expect


def test_train_few_frames_all_kept_sorted():
  rng = np.random.default_rng(0)
  extras = collections.Counter()
  for _ in range(300):
    ids = sample_frame_ids(2, 5, True, rng)
    assert len(ids) == 5 and ids == sorted(ids) and {0, 1} <= set(ids)
    extras[ids.count(0) - 1] += 1
  assert len(extras) == 4  # 0..3 extra copies of frame 0: draws with replacement


def test_train_segments():
  rng = np.random.default_rng(1)
  perms = ([4, 3, 3], [3, 4, 3], [3, 3, 4])
  counts = collections.Counter()
  for _ in range(600):
    ids = sample_frame_ids(10, 3, True, rng)
    fits = []
    for lens in perms:
      starts = np.cumsum([0] + lens[:-1])
      fits.append(all(s <= i < s + n for i, s, n in zip(ids, starts, lens)))
    assert any(fits), ids
    counts.update(ids)
  assert counts[3] > 0  # only possible when the first segment got the extra frame
  assert counts[6] > 0  # only possible when the last segment did ([0..2], [3..5], [6..9])
  assert set(counts) == set(range(10))


def test_train_uniform_within_segment():
  rng = np.random.default_rng(2)
  counts = collections.Counter(i for _ in range(3000) for i in sample_frame_ids(9, 3, True, rng))
  freq = np.array([counts[i] for i in range(9)]) / 3000
  np.testing.assert_allclose(freq, 1 / 3, atol=0.04)


def test_zero_frames_rejected():
  with pytest.raises(ValueError):
    sample_frame_ids(0, 3, True, np.random.default_rng(0))


# ------------------------------------------------------------------------- clip selection


def test_single_clip_random_caption():
  seen = {
    select_clip([[b"f"] * 4], ["a", "b"], False, np.random.default_rng(s)).caption
    for s in range(30)
  }
  assert seen == {"a", "b"}
  assert select_clip([[b"f"]], ["a"], False, np.random.default_rng(0)).clip_ids == (0,)


def test_non_continuous_skips_music():
  clips = [[b"f"]] * 3
  caps = ["[Music]", "one", "two"]
  seen = collections.Counter(
    select_clip(clips, caps, False, np.random.default_rng(s)).clip_ids for s in range(60)
  )
  assert set(seen) == {(1,), (2,)}
  c = select_clip(clips, caps, False, np.random.default_rng(0))
  assert c.caption == caps[c.clip_ids[0]]


def test_continuous_grows_to_min_frames_and_drops_music():
  clips = [[b"f"] * 3] * 4
  caps = ["a", "[Music]", "b", "c"]
  for s in range(40):
    c = select_clip(clips, caps, True, np.random.default_rng(s))
    # From any start, 8 counted frames need all three non-music clips (3 + 3 + 3).
    assert c.clip_ids == (0, 2, 3) and c.caption == "a b c"


def test_continuous_window_is_minimal_and_contiguous():
  clips = [[b"f"] * 5] * 4
  caps = ["a", "b", "c", "d"]
  seen = collections.Counter()
  for s in range(200):
    c = select_clip(clips, caps, True, np.random.default_rng(s))
    assert len(c.clip_ids) == 2 and c.clip_ids[1] == c.clip_ids[0] + 1  # 10 >= 8 frames
    assert c.caption == " ".join(caps[i] for i in c.clip_ids)
    seen[c.clip_ids] += 1
  assert set(seen) == {(0, 1), (1, 2), (2, 3)}


def test_continuous_short_video_uses_all_clips():
  c = select_clip([[b"f"], [b"f", b"f"]], ["x", "y"], True, np.random.default_rng(0))
  assert c.clip_ids == (0, 1) and c.caption == "x y"


@pytest.mark.parametrize(
  "clips,caps,cont,reason",
  [
    ([[b"f"], [b"f"]], ["[Music]", "[Music]"], False, "empty_caption"),
    ([[b"f"], [b"f"]], ["[Music]", "[Music]"], True, "empty_caption"),
    ([[]], ["a"], False, "empty_video"),
    ([], [], False, "empty_video"),
    ([[b"f"], [b"f"]], ["a"], False, "bad_field_type"),
  ],
)
def test_clip_errors(clips, caps, cont, reason):
  with pytest.raises(SkipRecord) as e:
    select_clip(clips, caps, cont, np.random.default_rng(0), record_id="vid-3")
  assert e.value.reason == reason and "vid-3" in str(e.value)
