"""Deterministic record checks shared by the validator, the converter and the transforms.

Everything here is a pure function of one canonical record (see `features.py`): an image that
does not decode, a caption that cleans or tokenises to nothing, a region whose every elem is
unusable, a video clip with no frames. Random per-use choices (which elem is cropped, which
caption is drawn) are not checked here; instead every alternative is checked, so a record that
passes can never fail deterministically later in the grain map.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines import features as F
from data_pipelines.text_ops import pre_caption

# PIL refuses huge images by default ("decompression bomb"); pre-training images are large but
# bounded, so allow up to ~1 gigapixel and still fail clearly beyond that.
Image.MAX_IMAGE_PIXELS = 1 << 30


def decode_image(data: bytes, record_id: str, field: str) -> np.ndarray:
  """Decodes an encoded image file (JPEG/PNG/...) to uint8 [H, W, 3] RGB.

  PIL is used because the official reader decodes with PIL and converts to RGB;
  `load()` forces the full decode so a truncated file fails here, not later.

  Raises:
    SkipRecord('corrupt_image') naming `record_id`/`field` on any failure (empty, garbage,
      truncated, zero-sized).
  """
  if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
    raise F.SkipRecord("corrupt_image", record_id, field, "no image bytes")
  try:
    with Image.open(io.BytesIO(bytes(data))) as im:
      im.load()
      rgb = im.convert("RGB")
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
    raise F.SkipRecord("corrupt_image", record_id, field, f"{type(e).__name__}: {e}") from None
  arr = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
  if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
    raise F.SkipRecord("corrupt_image", record_id, field, f"decoded shape {arr.shape}")
  return arr


def image_size(data: bytes, record_id: str, field: str) -> tuple[int, int]:
  """(width, height) of an encoded image, decoding it fully (so corrupt files are caught)."""
  arr = decode_image(data, record_id, field)
  return arr.shape[1], arr.shape[0]


def box_ok(bb, width: int, height: int, exact: bool = False) -> bool:
  """Whether an elem box passes the official crop rule (docs/fidelity.md#region-crop).

  The box is truncated with int() (towards zero, as the official pre-training code does; with
  `exact` it is kept as given, as the official grounding fine-tuning does), must have w, h > 0
  and lie inside the image: x >= 0, y >= 0, x + w <= W, y + h <= H.
  """
  try:
    x, y, w, h = (float(v) if exact else math.trunc(float(v)) for v in bb)
  except (TypeError, ValueError, OverflowError):
    return False
  return w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height


def _tokens(tokenizer: Any, text: str) -> list:
  """Word pieces of a cleaned caption, for our `text_ops.Tokenizer` or a Hugging Face one."""
  if hasattr(tokenizer, "pieces"):
    return tokenizer.pieces(text)[0]
  return tokenizer.tokenize(text)


def check_caption(text: str, tokenizer: Any, max_words: int, record_id: str, field: str) -> None:
  """Raises SkipRecord when a caption is empty after `pre_caption` or has no word piece."""
  cleaned = pre_caption(text, max_words, record_id, field)  # raises empty_caption / bad_field_type
  if not _tokens(tokenizer, cleaned):
    raise F.SkipRecord("caption_no_tokens", record_id, field, f"{text[:60]!r} has no word piece")


def elem_texts(elem: dict) -> list[str]:
  """Every text an elem can produce: `attribute + " " + caption`, or the caption."""
  attrs = elem.get("attributes") or []
  if not attrs:
    return list(elem["captions"])
  return [f"{a} {c}" for a in attrs for c in elem["captions"]]


def elem_problem(
  elem: dict,
  width: int,
  height: int,
  tokenizer: Any,
  max_words: int,
  record_id: str,
  field: str,
  exact_boxes: bool = False,
) -> str | None:
  """The skip reason that makes an elem unusable ('bad_box' or a caption reason), else None."""
  if not box_ok(elem["bb"], width, height, exact_boxes):
    return "bad_box"
  if not elem["captions"]:
    return "empty_caption"
  for text in elem_texts(elem):
    try:
      check_caption(text, tokenizer, max_words, record_id, field)
    except F.SkipRecord as e:
      return e.reason
  return None


def usable_elems(
  record: dict, width: int, height: int, tokenizer: Any, max_words: int
) -> list[int]:
  """Indices of the elems of a region record that pass `elem_problem` (in record order)."""
  rid = record["id"]
  return [
    i
    for i, e in enumerate(record["elems"])
    if elem_problem(e, width, height, tokenizer, max_words, rid, f"elems[{i}]") is None
  ]


def check_record(record: dict, tokenizer: Any, preproc_cfg: F.PreprocConfig) -> None:
  """Raises `SkipRecord` if the canonical record has any deterministic fault.

  Checks, in this order: every image / video frame decodes; every caption alternative survives
  `pre_caption` (max_words = max_tokens, as in pre-training) and yields >= 1 word piece;
  for regions, at least one elem is usable (its box passes the crop rule and all its texts are
  usable) — when none is, the reason is 'bad_box' if every elem failed on its box, else
  'no_usable_elem'; for videos, every clip has >= 1 frame.

  `tokenizer` is a `text_ops.Tokenizer` (anything with `.pieces(text)`) or a Hugging Face
  tokenizer (`.tokenize(text)`).
  """
  rid, kind = record["id"], record["kind"]
  size = None
  if kind == F.VIDEO:
    if not record["clips"] or any(len(c) == 0 for c in record["clips"]):
      raise F.SkipRecord("empty_video", rid, "clips", "a clip has 0 frames")
    for ci, clip in enumerate(record["clips"]):
      for fi, frame in enumerate(clip):
        decode_image(frame, rid, f"clips[{ci}][{fi}]")
  else:
    size = image_size(record["image"], rid, "image")
  check_texts(record, tokenizer, preproc_cfg.max_tokens, size, preproc_cfg.exact_boxes)


def check_texts(
  record: dict,
  tokenizer: Any,
  max_words: int,
  size: tuple[int, int] | None = None,
  exact_boxes: bool = False,
) -> list[int] | None:
  """The text and box part of `check_record` (no image decoding), shared with the pipeline.

  The training pipeline calls this on every example so that it skips exactly the records the
  validator reports, whatever its random choices. `size` = (width, height) of the image, needed
  for region records; `exact_boxes` as `PreprocConfig.exact_boxes`. Returns the usable elem
  indices of a region record (else None).
  """
  rid, kind = record["id"], record["kind"]
  if kind == F.VIDEO and (not record["clips"] or any(len(c) == 0 for c in record["clips"])):
    raise F.SkipRecord("empty_video", rid, "clips", "a clip has 0 frames")
  if kind in (F.IMAGE, F.VIDEO) and not record["captions"]:
    raise F.SkipRecord("empty_caption", rid, "captions", "no caption")
  for i, text in enumerate(record["captions"]):
    check_caption(text, tokenizer, max_words, rid, f"captions[{i}]")
  if kind != F.REGION:
    return None
  width, height = size
  problems = [
    elem_problem(e, width, height, tokenizer, max_words, rid, f"elems[{i}]", exact_boxes)
    for i, e in enumerate(record["elems"])
  ]
  if all(p is not None for p in problems):
    if problems and all(p == "bad_box" for p in problems):
      raise F.SkipRecord(
        "bad_box",
        rid,
        "elems",
        f"all {len(problems)} boxes fail the crop rule in a {width}x{height} image",
      )
    raise F.SkipRecord("no_usable_elem", rid, "elems", f"elem problems: {problems}")
  return [i for i, p in enumerate(problems) if p is None]
