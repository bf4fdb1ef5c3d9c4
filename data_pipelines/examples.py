"""Per-example builders: one canonical record -> one example dict of fixed-shape arrays.

`make_example(kind, record, rng, cfg, tokenizer)` is what the grain pipelines (`mixture.py`) map
over records. Every random choice (caption, crop, flip, RandAugment, elem order, frames, MLM
mask) is drawn from the given `rng`, so an example is a pure function of (record, seed). Bad input
raises `SkipRecord` naming the record and field; the packer adds the bookkeeping fields.

Output per kind (no batch axis; L = max_tokens, M = max_masks, R = image_res, T = (R/16)^2):
  image:  pixels uint8 [R, R, 3] + text fields
  region: pixels uint8 [R, R, 3]; for n texts (1 <= n <= max_regions) the text fields with a
          leading [n] axis, box float32 [n, 4] (cx, cy, w, h), patch_mask int32 [n, T],
          is_image int32 [n]
  video:  frames uint8 [F, R, R, 3], frame_valid int32 [F] + text fields
  text fields: text_ids, text_mask, mlm_ids int32 [L]; mlm_positions, mlm_labels int32 [M];
          mlm_weights float32 [M]
"""

from __future__ import annotations

import math

import numpy as np

from data_pipelines import features as F
from data_pipelines import image_ops, video_ops
from data_pipelines.checks import check_texts, decode_image
from data_pipelines.masking import mask_caption
from data_pipelines.text_ops import Tokenizer, pre_caption

_TEXT_KEYS = (F.TEXT_IDS, F.TEXT_MASK, F.MLM_IDS, F.MLM_POSITIONS, F.MLM_LABELS, F.MLM_WEIGHTS)


def text_fields(
  raw: str,
  rng: np.random.Generator,
  cfg: F.PreprocConfig,
  tokenizer: Tokenizer,
  record_id: str,
  field: str,
) -> dict[str, np.ndarray]:
  """pre_caption -> tokenise -> MLM mask for one raw caption (docs/fidelity.md#mlm-masking).

  Raises SkipRecord('empty_caption' / 'caption_no_tokens' / 'bad_field_type').
  """
  caption = pre_caption(raw, cfg.max_tokens, record_id, field)
  tok = tokenizer(caption, record_id, field)
  mlm = mask_caption(
    tok.ids, tok.pieces, rng, cfg, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size
  )
  return {F.TEXT_IDS: tok.ids, F.TEXT_MASK: tok.mask, **mlm}


def _pick(options, rng: np.random.Generator, record_id: str, field: str):
  """A uniformly random element of a non-empty list."""
  if not isinstance(options, (list, tuple)) or not options:
    raise F.SkipRecord("empty_caption", record_id, field, "no alternative to choose from")
  return options[int(rng.integers(0, len(options)))]


def _check_tokenizer(cfg: F.PreprocConfig, tokenizer: Tokenizer) -> None:
  if tokenizer.max_tokens != cfg.max_tokens:
    raise ValueError(
      f"tokenizer pads to {tokenizer.max_tokens} tokens but "
      f"PreprocConfig.max_tokens = {cfg.max_tokens}"
    )


def image_example(
  record: dict, rng: np.random.Generator, cfg: F.PreprocConfig, tokenizer: Tokenizer
) -> dict[str, np.ndarray]:
  """Image-text pair: one random caption, pre-training (or test) image transform."""
  rid = record["id"]
  img = decode_image(record["image"], rid, "image")  # [H, W, 3]
  check_texts(record, tokenizer, cfg.max_tokens)  # skip exactly what the validator reports
  k = int(rng.integers(0, len(record["captions"])))
  if cfg.train:
    pixels = image_ops.image_text_transform(
      img, rng, cfg.image_res, cfg.crop_scale, cfg.randaugment, allow_flip=cfg.hflip
    )
  else:
    pixels = image_ops.eval_transform(img, cfg.image_res)
  text = text_fields(record["captions"][k], rng, cfg, tokenizer, rid, f"captions[{k}]")
  return {F.PIXELS: pixels, **text}


def _elem_text(elem: dict, rng: np.random.Generator, rid: str, field: str) -> str:
  """attribute + " " + caption when attributes exist (random choice of each), else the caption."""
  caption = _pick(elem.get("captions"), rng, rid, f"{field}.captions")
  attrs = elem.get("attributes") or []
  if attrs:
    return f"{_pick(attrs, rng, rid, f'{field}.attributes')} {caption}"
  return caption


def _mentions_left_right(record: dict) -> bool:
  """careful_hflip test: "left"/"right" (any case) inside a caption, elem caption or attribute."""
  texts = list(record.get("captions") or [])
  for e in record["elems"]:
    texts += list(e.get("captions") or []) + list(e.get("attributes") or [])
  return any(("left" in t.lower() or "right" in t.lower()) for t in texts if isinstance(t, str))


def _add_elem_rows(rows, record, ok, view, rng, cfg, tokenizer) -> list[str]:
  """Appends (text, box, patch mask, 0) rows of the usable elems kept by the crop, in random
  order, up to cfg.max_regions rows in all; returns the problems of elems whose text failed."""
  rid, elems, problems = record["id"], record["elems"], []
  order = rng.permutation(len(elems)) if cfg.train else np.arange(len(elems))
  kept_boxes = set(ok) & set(np.flatnonzero(view.keep).tolist())
  for i in order.tolist():
    if len(rows) >= cfg.max_regions:
      break
    if i not in kept_boxes:
      continue
    field = f"elems[{i}]"
    try:
      raw = _elem_text(elems[i], rng, rid, field)
      text = text_fields(raw, rng, cfg, tokenizer, rid, field)
    except F.SkipRecord as e:
      problems.append(f"{field}: {e.reason}")
      continue
    b = view.boxes[i]
    rows.append(
      (
        text,
        image_ops.box_target(b, cfg.image_res),
        image_ops.patch_mask(b, cfg.image_res, cfg.patch_size),
        0,
      )
    )
  return problems


def region_example(
  record: dict, rng: np.random.Generator, cfg: F.PreprocConfig, tokenizer: Tokenizer
) -> dict[str, np.ndarray]:
  """Region/object record: crop around a random elem, then up to max_regions texts.

  The whole-image caption (if any) comes first with box (0.5, 0.5, 1, 1), an all-ones patch mask
  and is_image = 1 (kept even though the crop may cut the image); then elems in random
  order whose box keeps more than min_perc_in_image of its area inside the crop
  (docs/fidelity.md#region-crop, docs/fidelity.md#region-texts-and-boxes).
  """
  rid = record["id"]
  img = decode_image(record["image"], rid, "image")  # [H, W, 3]
  height, width = img.shape[:2]
  elems = record["elems"]
  # Deterministic filter shared with the validator: an elem is usable when its box passes the
  # crop rule and all its texts survive pre_caption + tokenisation; a bad whole-image caption
  # skips the record (as the official reader drops the line, docs/fidelity.md#bad-elems).
  ok = check_texts(record, tokenizer, cfg.max_tokens, (width, height), cfg.exact_boxes)
  boxes = np.zeros((len(elems), 4), np.float64)  # [N, 4] (x, y, w, h)
  for i in ok:
    boxes[i] = [float(v) if cfg.exact_boxes else math.trunc(float(v)) for v in elems[i]["bb"]]
  anchor = ok[int(rng.integers(0, len(ok)))]
  allow_flip = cfg.hflip and not (cfg.careful_hflip and _mentions_left_right(record))
  view = image_ops.region_transform(
    img,
    boxes,
    anchor,
    rng,
    image_res=cfg.image_res,
    min_perc_in_image=cfg.min_perc_in_image,
    train=cfg.train,
    randaugment=cfg.randaugment,
    allow_flip=allow_flip,
  )

  num_patches = (cfg.image_res // cfg.patch_size) ** 2
  rows: list[tuple[dict, np.ndarray, np.ndarray, int]] = []  # (text, box, patch mask, is_image)
  problems: list[str] = []
  if record.get("captions"):
    k = int(rng.integers(0, len(record["captions"])))
    text = text_fields(record["captions"][k], rng, cfg, tokenizer, rid, f"captions[{k}]")
    rows.append(
      (text, np.array([0.5, 0.5, 1.0, 1.0], np.float32), np.ones(num_patches, np.int32), 1)
    )
  problems += _add_elem_rows(rows, record, ok, view, rng, cfg, tokenizer)
  if not rows:
    raise F.SkipRecord(
      "no_usable_elem",
      rid,
      "elems",
      f"no text survives the crop and caption checks ({'; '.join(problems[:5])})",
    )
  out = {F.PIXELS: view.pixels}
  for key in _TEXT_KEYS:
    out[key] = np.stack([r[0][key] for r in rows])  # [n, L] / [n, M]
  out[F.BOX] = np.stack([r[1] for r in rows]).astype(np.float32)  # [n, 4]
  out[F.PATCH_MASK] = np.stack([r[2] for r in rows]).astype(np.int32)  # [n, T]
  out[F.IS_IMAGE] = np.array([r[3] for r in rows], np.int32)  # [n]
  return out


def video_example(
  record: dict, rng: np.random.Generator, cfg: F.PreprocConfig, tokenizer: Tokenizer
) -> dict[str, np.ndarray]:
  """Video record: clip selection, F sampled frames, each augmented independently.

  docs/fidelity.md#clip-selection, docs/fidelity.md#frame-sampling,
  docs/fidelity.md#independent-frame-augmentation.
  """
  rid = record["id"]
  check_texts(record, tokenizer, cfg.max_tokens)  # skip exactly what the validator reports
  clips = record["clips"]
  choice = video_ops.select_clip(
    clips, record["captions"], bool(record.get("is_continuous")), rng, rid
  )
  frames = [(f"clips[{c}][{j}]", data) for c in choice.clip_ids for j, data in enumerate(clips[c])]
  if not frames:
    raise F.SkipRecord("empty_video", rid, "clips", "0 frames")
  ids = video_ops.sample_frame_ids(len(frames), cfg.frame_len, cfg.train, rng)
  decoded = {i: decode_image(frames[i][1], rid, frames[i][0]) for i in sorted(set(ids))}
  out = np.empty((cfg.frame_len, cfg.image_res, cfg.image_res, 3), np.uint8)  # [F, R, R, 3]
  for f, i in enumerate(ids):
    # Independent crop/flip/RandAugment per frame, even for a repeated frame (official).
    if cfg.train:
      out[f] = image_ops.image_text_transform(
        decoded[i], rng, cfg.image_res, cfg.crop_scale, cfg.randaugment, allow_flip=cfg.hflip
      )
    else:
      out[f] = image_ops.eval_transform(decoded[i], cfg.image_res)
  text = text_fields(choice.caption, rng, cfg, tokenizer, rid, "captions")
  return {F.FRAMES: out, F.FRAME_VALID: np.ones(cfg.frame_len, np.int32), **text}


_BUILDERS = {F.IMAGE: image_example, F.REGION: region_example, F.VIDEO: video_example}

# Top-level fields each kind needs, with their container type (features.py record contract).
_REQUIRED = {
  F.IMAGE: {"image": (bytes, bytearray, memoryview), "captions": (list, tuple)},
  F.REGION: {
    "image": (bytes, bytearray, memoryview),
    "captions": (list, tuple),
    "elems": (list, tuple),
  },
  F.VIDEO: {"clips": (list, tuple), "captions": (list, tuple)},
}


def _check_fields(kind: str, record: dict, rid: str) -> None:
  """SkipRecord('bad_field_type') naming the field when the record breaks the contract."""
  for key, types in _REQUIRED[kind].items():
    if key not in record:
      raise F.SkipRecord("bad_field_type", rid, key, "missing")
    if not isinstance(record[key], types):
      raise F.SkipRecord("bad_field_type", rid, key, f"is {type(record[key]).__name__}")
  for i, c in enumerate(record["captions"]):
    if not isinstance(c, str):
      raise F.SkipRecord("bad_field_type", rid, f"captions[{i}]", f"is {type(c).__name__}")
  if kind == F.REGION:
    for i, e in enumerate(record["elems"]):
      if not isinstance(e, dict) or not isinstance(e.get("captions"), (list, tuple)):
        raise F.SkipRecord(
          "bad_field_type", rid, f"elems[{i}]", "need a dict with a 'captions' list"
        )
      bb = e.get("bb")
      if not isinstance(bb, (list, tuple, np.ndarray)) or len(bb) != 4:
        raise F.SkipRecord(
          "bad_field_type", rid, f"elems[{i}].bb", f"need [x, y, w, h], got {bb!r}"
        )
  if kind == F.VIDEO:
    for i, clip in enumerate(record["clips"]):
      if not isinstance(clip, (list, tuple)):
        raise F.SkipRecord("bad_field_type", rid, f"clips[{i}]", f"is {type(clip).__name__}")


def make_example(
  kind: str, record: dict, rng: np.random.Generator, cfg: F.PreprocConfig, tokenizer: Tokenizer
) -> dict[str, np.ndarray]:
  """Builds one example of `kind` from a canonical record (see module docstring).

  Raises:
    SkipRecord for bad input (naming record id and field); ValueError for an unknown kind or a
    tokenizer whose length disagrees with `cfg`.
  """
  if kind not in _BUILDERS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {F.KINDS}")
  _check_tokenizer(cfg, tokenizer)
  if not isinstance(record, dict):
    raise F.SkipRecord("bad_field_type", "?", "record", f"is {type(record).__name__}, not dict")
  rid = str(record.get("id", "?"))
  if cfg.task_fields:  # VQA / NLVR2 / video QA examples (task_examples.py)
    from data_pipelines import task_examples  # pylint: disable=g-import-not-at-top

    return task_examples.make_example(kind, dict(record, id=rid, kind=kind), rng, cfg, tokenizer)
  _check_fields(kind, record, rid)
  return _BUILDERS[kind](dict(record, id=rid, kind=kind), rng, cfg, tokenizer)
