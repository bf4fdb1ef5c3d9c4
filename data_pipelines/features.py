"""Feature-key constants, the canonical source record, and the MixedBatch specification.

Two contracts live here:

1. **Canonical record** (what every source yields, before any transform). JSON-lines, ArrayRecord
   and the synthetic world all produce exactly this dict, so readers can be compared for equality
   and transforms never care where a record came from:

   common:   'kind'   str  one of KINDS
             'id'     str  stable id of the record (given by the data, else "<file>:<line>")
   image and video, optional:
             'image_id' str  the data's id of the image / video (the official retrieval files'
                             `image_id` or index key); records of one image share it
   image:    'image'    bytes   the encoded image file (JPEG/PNG/...), not decoded
             'captions' list[str]  >= 1 caption (one is drawn per use)
   region:   'image'    bytes
             'captions' list[str]  whole-image captions (may be empty)
             'elems'    list[dict]: 'bb' list[float] [x, y, w, h] pixels of the original image
                                    (top-left + size), 'captions' list[str] (>= 1),
                                    'attributes' list[str] (may be empty)
   video:    'clips'        list[list[bytes]]  one or more clips of encoded frames
             'captions'     list[str]  one per clip when there are several clips, else >= 1
             'is_continuous' bool

2. **MixedBatch** (what one training step consumes): a dict kind -> dict field -> numpy array,
   with static shapes from `BatchSizes` (see `batch_spec`). Padding rows have valid = 0.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping

import numpy as np

IMAGE, REGION, VIDEO = "image", "region", "video"
KINDS = (IMAGE, REGION, VIDEO)

# Text fields shared by every kind.
TEXT_IDS = "text_ids"  # int32 [B, L] token ids of the unmasked caption, [PAD]=0 padded
TEXT_MASK = "text_mask"  # int32 [B, L] 1 for real tokens
MLM_IDS = "mlm_ids"  # int32 [B, L] ids after MLM masking
MLM_POSITIONS = "mlm_positions"  # int32 [B, M] masked positions, padded with 0
MLM_LABELS = "mlm_labels"  # int32 [B, M] original ids at those positions, padded with 0
MLM_WEIGHTS = "mlm_weights"  # float32 [B, M] 1 for real masked positions, 0 for padding
VALID = "valid"  # int32 [B] 1 for a real row, 0 for padding
RECORD_ID = "record_id"  # int32 [B] index of the record within its source (-1 for padding)
SOURCE_ID = "source_id"  # int32 [B] index of the source within the kind (-1 for padding)
# int32 [B] image and video kinds: `image_id_hash` of the record's image id (of its record id
# when it has none), -1 for padding; a model input (retrieval: ITC soft targets, ITM negatives).
IMAGE_ID = "image_id"

# Vision fields.
PIXELS = "pixels"  # uint8 [N, R, R, 3] (image kind: N = B; region kind: N = max_images)
IMAGE_VALID = "image_valid"  # int32 [N] region kind: 1 for a real image slot
IMAGE_INDEX = "image_index"  # int32 [B] region kind: which image of PIXELS each text belongs to
BOX = "box"  # float32 [B, 4] region kind: normalised (cx, cy, w, h)
PATCH_MASK = "patch_mask"  # int32 [B, T] region kind: 1 for patches inside the box (no token 0)
IS_IMAGE = "is_image"  # int32 [B] region kind: 1 if the text describes the whole image
FRAMES = "frames"  # uint8 [B, F, R, R, 3] video kind
FRAME_VALID = "frame_valid"  # int32 [B, F] video kind

# Fine-tuning task fields: added to one kind's sub-batch when `BatchSizes.task_fields` names the
# task (never present in pre-training batches; docs/finetuning.md).
ANSWER_IDS = "answer_ids"  # int32 [B, A, La] VQA: `[CLS] answer [SEP]` of up to A answers
ANSWER_MASK = "answer_mask"  # int32 [B, A, La]
ANSWER_WEIGHTS = "answer_weights"  # float32 [B, A] VQA: each answer's weight (0: empty slot)
PAIR_PIXELS = "pair_pixels"  # uint8 [B, R, R, 3] NLVR2: the second (right) image of the pair
LABEL = "label"  # int32 [B] NLVR2 (1 = true) / video QA answer class; IGNORE_LABEL: no class
IGNORE_LABEL = -100  # an answer outside the answer vocabulary (ignored by the loss)
# Captioning (`caption_examples.py`): the caption with a [MASK] inserted before every masked
# token, Lc = max_tokens + max_masks; mlm_positions / labels / weights index its [MASK] slots.
CAPTION_IDS = "caption_ids"  # int32 [B, Lc] `[CLS] prompt caption [SEP]` + inserted [MASK]s
CAPTION_POSITIONS = "caption_positions"  # int32 [B, Lc] position ids ([MASK] = its token's)
CAPTION_INSERTED = "caption_inserted"  # int32 [B, Lc] 1 at an inserted [MASK]
VQA, NLVR2, VIDEO_QA, CAPTION = "vqa", "nlvr2", "video_qa", "caption"
# task fields -> the kind they extend
TASK_KIND = {VQA: IMAGE, NLVR2: IMAGE, VIDEO_QA: VIDEO, CAPTION: IMAGE}

TEXT_FIELDS = (
  TEXT_IDS,
  TEXT_MASK,
  MLM_IDS,
  MLM_POSITIONS,
  MLM_LABELS,
  MLM_WEIGHTS,
  VALID,
  RECORD_ID,
  SOURCE_ID,
)
# Fields that stay on the host (bookkeeping, not model inputs).
HOST_ONLY_FIELDS = (RECORD_ID, SOURCE_ID)

# Reasons a record can be skipped; every skip increments exactly one of these counters.
SKIP_REASONS = (
  "bad_json",  # the line is not a JSON object
  "bad_field_type",  # a field has the wrong type or a required field is missing
  "corrupt_image",  # image bytes that do not decode (truncated, garbage, bad base64)
  "missing_image",  # an image path that does not exist
  "empty_caption",  # caption empty or whitespace after pre_caption
  "caption_no_tokens",  # caption that tokenises to nothing
  "bad_box",  # every elem box non-positive or outside the image
  "no_usable_elem",  # region record whose elems all fail (e.g. min_perc_in_image)
  "empty_video",  # video with 0 frames
)


@dataclasses.dataclass(frozen=True)
class BatchSizes:
  """Static per-step sizes. All batch sizes are per process (host-local)."""

  image_res: int = 224
  patch_size: int = 16
  max_tokens: int = 40  # L
  max_masks: int = 12  # M
  image_batch: int = 0  # B_i texts = images
  region_batch: int = 0  # B_r texts
  region_max_images: int = 0  # N_i image slots of a region sub-batch
  video_batch: int = 0  # B_v clips
  frame_len: int = 3  # F
  task_fields: str = ""  # '' or a TASK_KIND key: that task's fields in its kind's sub-batch
  max_answers: int = 0  # A: answer slots per question (VQA)
  answer_tokens: int = 0  # La: tokens per answer (VQA)

  @property
  def num_patches(self) -> int:
    return (self.image_res // self.patch_size) ** 2


def task_spec(s: BatchSizes, b: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """The fields `s.task_fields` adds to its kind's sub-batch of b rows (none when '')."""
  if s.task_fields not in TASK_KIND:
    return {}
  if s.task_fields == VQA:
    a, la = s.max_answers, s.answer_tokens
    if a < 1 or la < 3:
      raise ValueError(f"VQA batches need max_answers >= 1 and answer_tokens >= 3, got {a}, {la}")
    return {
      ANSWER_IDS: ((b, a, la), np.int32),
      ANSWER_MASK: ((b, a, la), np.int32),
      ANSWER_WEIGHTS: ((b, a), np.float32),
    }
  if s.task_fields == CAPTION:
    lc = s.max_tokens + s.max_masks
    return {k: ((b, lc), np.int32) for k in (CAPTION_IDS, CAPTION_POSITIONS, CAPTION_INSERTED)}
  out = {LABEL: ((b,), np.int32)}
  if s.task_fields == NLVR2:
    out[PAIR_PIXELS] = ((b, s.image_res, s.image_res, 3), np.uint8)
  return out


def batch_spec(s: BatchSizes) -> dict[str, dict[str, tuple[tuple[int, ...], np.dtype]]]:
  """kind -> field -> (shape, dtype). A kind with batch size 0 is absent."""
  R, L, M = s.image_res, s.max_tokens, s.max_masks

  def text(b):
    return {
      TEXT_IDS: ((b, L), np.int32),
      TEXT_MASK: ((b, L), np.int32),
      MLM_IDS: ((b, L), np.int32),
      MLM_POSITIONS: ((b, M), np.int32),
      MLM_LABELS: ((b, M), np.int32),
      MLM_WEIGHTS: ((b, M), np.float32),
      VALID: ((b,), np.int32),
      RECORD_ID: ((b,), np.int32),
      SOURCE_ID: ((b,), np.int32),
    }

  spec = {}
  if s.image_batch:
    b = s.image_batch
    spec[IMAGE] = {
      PIXELS: ((b, R, R, 3), np.uint8),
      IMAGE_ID: ((b,), np.int32),
      **text(b),
    }
  if s.region_batch:
    b, n = s.region_batch, s.region_max_images
    spec[REGION] = {
      PIXELS: ((n, R, R, 3), np.uint8),
      IMAGE_VALID: ((n,), np.int32),
      IMAGE_INDEX: ((b,), np.int32),
      BOX: ((b, 4), np.float32),
      PATCH_MASK: ((b, s.num_patches), np.int32),
      IS_IMAGE: ((b,), np.int32),
      **text(b),
    }
  if s.video_batch:
    b, f = s.video_batch, s.frame_len
    spec[VIDEO] = {
      FRAMES: ((b, f, R, R, 3), np.uint8),
      FRAME_VALID: ((b, f), np.int32),
      IMAGE_ID: ((b,), np.int32),
      **text(b),
    }
  if s.task_fields:
    kind = TASK_KIND.get(s.task_fields)
    if kind is None:
      raise ValueError(f"task_fields {s.task_fields!r}: expected '' or one of {sorted(TASK_KIND)}")
    if kind in spec:
      spec[kind].update(task_spec(s, spec[kind][VALID][0][0]))
  return spec


def image_id_hash(value: str) -> int:
  """A stable non-negative 31-bit int of an image id string (crc32 of its UTF-8 bytes)."""
  return zlib.crc32(value.encode("utf-8")) & 0x7FFFFFFF


def record_image_id(record: Mapping) -> int:
  """The IMAGE_ID of a canonical record: hash of its 'image_id', else of its record 'id'.

  Records without an image id thus stay distinct from each other (one image per record).
  """
  value = record.get("image_id")
  return image_id_hash(str(record.get("id", "?") if value is None else value))


def check_batch(batch, s: BatchSizes) -> None:
  """Raises ValueError naming the kind and field if a batch deviates from the spec."""
  spec = batch_spec(s)
  if set(batch) != set(spec):
    raise ValueError(f"batch kinds {sorted(batch)} != configured kinds {sorted(spec)}")
  for kind, fields in spec.items():
    if set(batch[kind]) != set(fields):
      raise ValueError(f"{kind}: fields {sorted(batch[kind])} != spec {sorted(fields)}")
    for name, (shape, dtype) in fields.items():
      arr = batch[kind][name]
      if tuple(arr.shape) != shape or arr.dtype != dtype:
        raise ValueError(
          f"{kind}/{name}: got {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}"
        )


@dataclasses.dataclass(frozen=True)
class PreprocConfig:
  """Per-example preprocessing settings (released pre-training values,
  docs/fidelity.md#data-and-masking)."""

  image_res: int = 224
  patch_size: int = 16
  max_tokens: int = 40
  max_masks: int = 12
  mask_prob: float = 0.5
  skipgram_prb: float = 0.2
  skipgram_size: int = 3
  mask_whole_word: bool = True
  min_perc_in_image: float = 0.5
  max_regions: int = 5  # texts kept per region record
  frame_len: int = 3
  randaugment: bool = True
  crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale (fine-tuning: (0.5, 1))
  careful_hflip: bool = False  # region crops: no flip if "left"/"right" occurs in a text
  # Region boxes keep their fractional pixels for the crop rule, the crop and the target, as
  # the official grounding fine-tuning does (pre-training truncates them with int()).
  exact_boxes: bool = False
  hflip: bool = True  # random horizontal flips (official); False keeps "left"/"right" texts true
  # Fine-tuning examples (data_pipelines/task_examples.py): '' or a TASK_KIND key, and the VQA
  # answer slots / tokens (as BatchSizes).
  task_fields: str = ""
  max_answers: int = 0
  answer_tokens: int = 0
  caption_prompt: str = "a picture of"  # captioning: the official prompt after [CLS]
  train: bool = True  # False: deterministic test transform (bicubic resize, eval frame sampling)


class SkipRecord(Exception):
  """Raised by readers and per-example transforms for a record that must be skipped.

  `reason` is one of SKIP_REASONS; the message names the record and the offending field.
  """

  def __init__(self, reason: str, record_id: str, field: str, detail: str = ""):
    if reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {reason!r}")
    self.reason, self.record_id, self.field, self.detail = reason, record_id, field, detail
    super().__init__(
      f"{record_id}: {reason} in field {field!r}" + (f": {detail}" if detail else "")
    )
