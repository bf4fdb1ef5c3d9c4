"""Evaluation sets built straight from source records (the same formats training reads).

Retrieval needs distinct images, each with all of its captions (COCO/Flickr style), while the
pre-training formats may hold one line per (image, caption) pair. `retrieval_set` therefore
groups records by the bytes of their image: identical images become one entry whose captions
are the union of the records' captions, in first-seen order.

Grounding needs, per referring phrase, the full image and the ground-truth box in pixels of the
original image. `grounding_set` turns every elem of every region record into one phrase.

Both apply the deterministic test transform (bicubic resize to R x R,
docs/fidelity.md#image-transforms) and the training text path (`pre_caption` with `max_tokens`
words, fixed-length BERT tokens, docs/fidelity.md#retrieval-text-preprocessing).
Bad records and captions are skipped and counted per reason (`features.SKIP_REASONS`), never
silently: the counts come back with the set.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import features as F
from data_pipelines import image_ops, video_ops
from data_pipelines.checks import box_ok, decode_image
from data_pipelines.text_ops import Tokenizer, pre_caption


@dataclasses.dataclass
class RetrievalSet:
  """Distinct images with their captions.

  pixels   uint8 [Ni, R, R, 3] test-transformed images (videos: [Ni, F, R, R, 3] frames)
  ids      int32 [Nt, L], mask int32 [Nt, L] tokenised captions
  txt2img  int64 [Nt] image of each caption; img2txt: Ni lists of caption indices
  captions the cleaned caption strings [Nt]; image_ids the record id of each image [Ni]
  skips    {reason: count} of dropped records / captions
  """

  pixels: np.ndarray
  ids: np.ndarray
  mask: np.ndarray
  txt2img: np.ndarray
  img2txt: list[list[int]]
  captions: list[str]
  image_ids: list[str]
  skips: dict[str, int]


@dataclasses.dataclass
class GroundingSet:
  """Referring phrases with their images and boxes.

  pixels    uint8 [Ni, R, R, 3] test-transformed distinct images
  originals the decoded original images (for drawing) [Ni]
  image_index int32 [Np] image of each phrase
  ids, mask int32 [Np, L] tokenised phrases; phrases: the cleaned strings [Np]
  image_wh  float32 [Np, 2] original (width, height); gt_boxes float32 [Np, 4] pixel (x, y, w, h)
  skips     {reason: count}
  """

  pixels: np.ndarray
  originals: list[np.ndarray]
  image_index: np.ndarray
  ids: np.ndarray
  mask: np.ndarray
  phrases: list[str]
  image_wh: np.ndarray
  gt_boxes: np.ndarray
  skips: dict[str, int]


def _records(sources: Sequence[Any], skips: collections.Counter) -> Iterable[dict]:
  """Every record of every source in order; unreadable ones are counted and skipped."""
  for src in sources:
    for i in range(len(src)):
      try:
        yield src[i]
      except F.SkipRecord as e:
        skips[e.reason] += 1


def _tokenize(raw: Any, tokenizer: Tokenizer, rid: str, field: str) -> tuple[str, Any]:
  """(cleaned caption, TokenizedText); raises SkipRecord like the training path."""
  caption = pre_caption(raw, tokenizer.max_tokens, rid, field)
  return caption, tokenizer(caption, rid, field)


def _stack(rows: list[np.ndarray], shape: tuple[int, ...], dtype) -> np.ndarray:
  return np.stack(rows).astype(dtype) if rows else np.zeros((0,) + shape, dtype)


def _vision_key(rec: Mapping[str, Any], frame_len: int) -> tuple[str, Any] | None:
  """(digest of the image / all frames, the encoded data) of a record; None if malformed."""
  if frame_len:  # video: every frame of every clip, in order
    clips = rec.get("clips")
    if not isinstance(clips, (list, tuple)) or not all(isinstance(c, (list, tuple)) for c in clips):
      return None
    frames = [bytes(f) for c in clips for f in c]
    return hashlib.sha1(b"".join(frames)).hexdigest(), frames
  data = rec.get("image")
  if not isinstance(data, (bytes, bytearray, memoryview)):
    return None
  return hashlib.sha1(bytes(data)).hexdigest(), data


def _vision_pixels(data: Any, rid: str, image_res: int, frame_len: int) -> np.ndarray:
  """[R, R, 3] test-transformed image, or [F, R, R, 3] frames (evaluation frame sampling)."""
  if not frame_len:
    return image_ops.eval_transform(decode_image(data, rid, "image"), image_res)
  if not data:
    raise F.SkipRecord("empty_video", rid, "clips", "0 frames")
  ids = video_ops.sample_frame_ids(len(data), frame_len, False, np.random.default_rng(0))
  return np.stack(
    [image_ops.eval_transform(decode_image(data[i], rid, f"frames[{i}]"), image_res) for i in ids]
  )


def retrieval_set(
  sources: Sequence[Any],
  tokenizer: Tokenizer,
  image_res: int,
  max_images: int = 0,
  frame_len: int = 0,
) -> RetrievalSet:
  """Distinct images (grouped by image bytes) of image-kind records with all their captions;
  with frame_len > 0, distinct videos of video-kind records (grouped by their frames), each as
  `frame_len` frames sampled as the official evaluation samples them.

  max_images > 0 keeps only the first max_images distinct images (quick periodic evaluation).
  """
  skips: collections.Counter = collections.Counter()
  by_hash: dict[str, int] = {}
  pixels, image_ids, img2txt = [], [], []
  ids, mask, txt2img, captions = [], [], [], []
  for rec in _records(sources, skips):
    rid, raw_caps = str(rec.get("id", "?")), rec.get("captions")
    key = _vision_key(rec, frame_len)
    if key is None or not isinstance(raw_caps, (list, tuple)):
      skips["bad_field_type"] += 1
      continue
    digest, data = key
    if digest not in by_hash:
      if max_images and len(pixels) >= max_images:
        continue
      try:
        vision = _vision_pixels(data, rid, image_res, frame_len)
      except F.SkipRecord as e:
        skips[e.reason] += 1
        continue
      by_hash[digest] = len(pixels)
      pixels.append(vision)
      image_ids.append(rid)
      img2txt.append([])
    index = by_hash[digest]
    for k, raw in enumerate(raw_caps):
      try:
        caption, tok = _tokenize(raw, tokenizer, rid, f"captions[{k}]")
      except F.SkipRecord as e:
        skips[e.reason] += 1
        continue
      img2txt[index].append(len(captions))
      txt2img.append(index)
      ids.append(tok.ids)
      mask.append(tok.mask)
      captions.append(caption)
  # An image all of whose captions were dropped cannot be a retrieval target (the official
  # protocol needs >= 1 ground-truth text per image): drop it and renumber.
  keep = [i for i, t in enumerate(img2txt) if t]
  if len(keep) < len(img2txt):
    skips["empty_caption"] += len(img2txt) - len(keep)
    remap = {old: new for new, old in enumerate(keep)}
    pixels = [pixels[i] for i in keep]
    image_ids = [image_ids[i] for i in keep]
    img2txt = [img2txt[i] for i in keep]
    txt2img = [remap[i] for i in txt2img]
  if not pixels:
    raise ValueError(f"retrieval evaluation set is empty (skipped: {dict(skips)})")
  L = tokenizer.max_tokens
  return RetrievalSet(
    pixels=np.stack(pixels),
    ids=_stack(ids, (L,), np.int32),
    mask=_stack(mask, (L,), np.int32),
    txt2img=np.asarray(txt2img, np.int64),
    img2txt=img2txt,
    captions=captions,
    image_ids=image_ids,
    skips=dict(skips),
  )


def elem_phrase(elem: Mapping[str, Any]) -> Any:
  """The deterministic referring phrase of an elem: first attribute + first caption.

  Training draws one attribute and one caption at random; evaluation needs one fixed
  phrase, and the first of each is the most generic (e.g. "red" + "circle").
  """
  caps = elem.get("captions") or [None]
  attrs = elem.get("attributes") or []
  if attrs and isinstance(attrs[0], str) and isinstance(caps[0], str):
    return f"{attrs[0]} {caps[0]}"
  return caps[0]


def grounding_set(
  sources: Sequence[Any], tokenizer: Tokenizer, image_res: int, max_phrases: int = 0
) -> GroundingSet:
  """One phrase per elem of every region-kind record, with the full image and its pixel box."""
  skips: collections.Counter = collections.Counter()
  pixels, originals = [], []
  index, ids, mask, phrases, wh, boxes = [], [], [], [], [], []
  for rec in _records(sources, skips):
    if max_phrases and len(phrases) >= max_phrases:
      break
    rid = str(rec.get("id", "?"))
    data, elems = rec.get("image"), rec.get("elems")
    if not isinstance(data, (bytes, bytearray, memoryview)) or not isinstance(elems, (list, tuple)):
      skips["bad_field_type"] += 1
      continue
    try:
      img = decode_image(data, rid, "image")  # [H, W, 3]
    except F.SkipRecord as e:
      skips[e.reason] += 1
      continue
    height, width = img.shape[:2]
    rows = []
    for j, elem in enumerate(elems):
      field = f"elems[{j}]"
      if not isinstance(elem, Mapping) or not box_ok(elem.get("bb"), width, height):
        skips["bad_box"] += 1
        continue
      try:
        phrase, tok = _tokenize(elem_phrase(elem), tokenizer, rid, field)
      except F.SkipRecord as e:
        skips[e.reason] += 1
        continue
      rows.append((phrase, tok, [float(v) for v in elem["bb"]]))
    if not rows:
      continue
    for phrase, tok, bb in rows[: max_phrases - len(phrases) if max_phrases else None]:
      index.append(len(pixels))
      ids.append(tok.ids)
      mask.append(tok.mask)
      phrases.append(phrase)
      wh.append((width, height))
      boxes.append(bb)
    pixels.append(image_ops.eval_transform(img, image_res))
    originals.append(img)
  if not phrases:
    raise ValueError(f"grounding evaluation set is empty (skipped: {dict(skips)})")
  return GroundingSet(
    pixels=np.stack(pixels),
    originals=originals,
    image_index=np.asarray(index, np.int32),
    ids=np.stack(ids).astype(np.int32),
    mask=np.stack(mask).astype(np.int32),
    phrases=phrases,
    image_wh=np.asarray(wh, np.float32),
    gt_boxes=np.asarray(boxes, np.float32),
    skips=dict(skips),
  )
