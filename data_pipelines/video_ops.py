"""Frame sampling and clip selection for video records.

Pure index/choice logic: which frames of which clips to decode, and which caption goes with them.
Decoding and the per-frame image transform (each frame augmented independently) are done by
`examples.py`. Official rules: docs/fidelity.md#frame-sampling, docs/fidelity.md#clip-selection.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.features import SkipRecord

MUSIC = "[Music]"  # caption of clips without speech in HowTo100M-style data; never trained on
MIN_FRAMES_BEFORE_SAMPLING = 8  # official `mininum_frames_before_sampling`


def sample_frame_ids(nf: int, num_frames: int, train: bool, rng: np.random.Generator) -> list[int]:
  """Indices of `num_frames` frames out of `nf` available (docs/fidelity.md#frame-sampling).

  nf <= F: train -> all nf frames plus F-nf drawn uniformly with replacement, sorted; eval ->
  i mod nf for i < F. nf > F: F consecutive segments of length nf//F, the nf - F*(nf//F) leftover
  frames lengthen some segments by 1 (random ones in training, the first ones at eval); train
  takes a uniform frame inside each segment, eval each segment's first frame.
  """
  if nf <= 0:
    raise ValueError(f"need at least one frame, got nf={nf}")
  f = num_frames
  if nf <= f:
    if not train:
      return [i % nf for i in range(f)]
    extra = rng.integers(0, nf, size=f - nf).tolist()
    return sorted(list(range(nf)) + extra)
  base, left = divmod(nf, f)
  plus = np.array([1] * left + [0] * (f - left))
  if train:
    plus = rng.permutation(plus)
  lengths = base + plus  # [F]
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # [F]
  if not train:
    return starts.tolist()
  return [int(s + rng.integers(0, n)) for s, n in zip(starts, lengths)]


@dataclasses.dataclass(frozen=True)
class ClipChoice:
  """The clips (indices into the record's clips, in order) and the raw caption selected."""

  clip_ids: tuple[int, ...]
  caption: str


def _is_music(caption: str) -> bool:
  return caption.strip() == MUSIC


def select_clip(
  clips: list[list],
  captions: list[str],
  is_continuous: bool,
  rng: np.random.Generator,
  record_id: str = "?",
  min_frames: int = MIN_FRAMES_BEFORE_SAMPLING,
) -> ClipChoice:
  """Chooses the clips and caption of one training example from a video record.

  The frames of the example are the concatenated frames of `clip_ids`.

  - one clip: its frames, a random caption among `captions`;
  - several clips, not continuous: a random clip whose caption is not "[Music]";
  - several clips, continuous: grow a window from a random clip one neighbour at a time (left or
    right with p 1/2; one side at an edge) until the non-[Music] frames reach `min_frames` or all
    clips are in; drop [Music] clips; concatenate frames; join captions with spaces.

  Raises:
    SkipRecord('empty_caption') if only [Music] captions remain, ('empty_video') if no frame,
    ('bad_field_type') if captions do not pair with clips.
  """
  if not clips:
    raise SkipRecord("empty_video", record_id, "clips", "no clip")
  if len(clips) == 1:
    if not captions:
      raise SkipRecord("empty_caption", record_id, "captions", "no caption")
    if not clips[0]:
      raise SkipRecord("empty_video", record_id, "clips", "the clip has 0 frames")
    return ClipChoice((0,), captions[int(rng.integers(0, len(captions)))])
  if len(captions) != len(clips):
    raise SkipRecord(
      "bad_field_type", record_id, "captions", f"{len(captions)} captions for {len(clips)} clips"
    )
  if not is_continuous:
    ok = [i for i, c in enumerate(captions) if not _is_music(c)]
    if not ok:
      raise SkipRecord("empty_caption", record_id, "captions", "every clip is [Music]")
    i = ok[int(rng.integers(0, len(ok)))]
    if not clips[i]:
      raise SkipRecord("empty_video", record_id, "clips", f"clip {i} has 0 frames")
    return ClipChoice((i,), captions[i])

  n = len(clips)
  lo = hi = int(rng.integers(0, n))  # window [lo, hi], inclusive

  def counted(a: int, b: int) -> int:
    return sum(len(clips[k]) for k in range(a, b + 1) if not _is_music(captions[k]))

  while counted(lo, hi) < min_frames and (lo > 0 or hi < n - 1):
    if lo == 0:
      hi += 1
    elif hi == n - 1:
      lo -= 1
    elif rng.random() < 0.5:
      lo -= 1
    else:
      hi += 1
  keep = [k for k in range(lo, hi + 1) if not _is_music(captions[k])]
  if not keep:
    raise SkipRecord("empty_caption", record_id, "captions", "every clip in the window is [Music]")
  if not any(len(clips[k]) for k in keep):
    raise SkipRecord("empty_video", record_id, "clips", "the selected clips have 0 frames")
  return ClipChoice(tuple(keep), " ".join(captions[k] for k in keep))
