"""Synthetic fine-tuning data from the shapes world, written in the official file formats.

Each writer puts real files on disk (PNG images under an image root, JSON arrays, the REFER
pickle, COCO instances, JSON frame files), so tests and demos exercise the production readers
(`sources.JsonArraySource`, `refcoco.RefcocoSource`) through `mixture.build_source`. Every
writer is deterministic for its `seed` and returns a small dataclass whose `source(split)` is
the config entry of that split (docs/data.md#synthetic-fine-tuning-tasks):

  write_retrieval         image-text retrieval (COCO/Flickr Karpathy style): train entries
                          one per caption with an image_id, val/test one per image with 5
                          captions
  write_grounding         RefCOCO+-style grounding: refcoco+_{train,val,test}.json,
                          refs(unc).p, instances.json; expressions name ONE shape unambiguously
  write_video_retrieval   MSRVTT-style video retrieval: one JSON file of base64 frames per clip

Splits come from disjoint world seeds (`split_seed`); images are also de-duplicated across the
splits of one call, so no held-out image appears in training.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines import features as F
from data_pipelines.synthetic import (
  HELDOUT_SEED,
  TRAIN_SEED,
  Shape,
  ShapesWorld,
  WorldConfig,
  relation,
  where,
)

_SPLIT_OFFSET = {"train": None, "val": 0, "test": 1, "testA": 2, "testB": 3}
# Video entry keys of the synthetic MSRVTT-style files (the official names are configurable).
VIDEO_KEYS = {"image_key": "video", "caption_key": "caption", "image_id_key": "video_id"}


def split_seed(seed: int, split: str) -> int:
  """World seed of a split: `seed` for train, HELDOUT_SEED-offset seeds for the held-out ones."""
  off = _SPLIT_OFFSET[split]
  return int(seed) if off is None else int(seed) + HELDOUT_SEED + off


def _png(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _write_json(path: str, obj) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False)
  return path


def _scenes(world: ShapesWorld, n: int, seen: set[str]):
  """The first n scenes of a world whose pixels are new: (index, png bytes, shapes)."""
  out, index = [], 0
  while len(out) < n:
    pixels, shapes = world.scene(index, F.IMAGE)
    data = _png(pixels)
    digest = hashlib.sha1(data).hexdigest()
    if digest not in seen:
      seen.add(digest)
      out.append((index, data, shapes))
    index += 1
  return out


def _join(parts: list[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" and {parts[-1]}"


def scene_captions(shapes: list[Shape], image_size: int, rng, n: int) -> list[str]:
  """n true captions of a scene, each naming EVERY shape (so a caption picks out its image as
  well as the scene allows, as COCO's captions describe the whole picture; a caption naming one
  of several shapes would also fit other images and make retrieval labels noisy): the listing,
  then relations (two shapes), positions and other phrasings in a random order."""
  phrases = [s.phrase() for s in shapes]
  plain = [s.phrase(with_size=False) for s in shapes]
  listing = _join(phrases)
  pool = [listing, f"a picture of {listing}", _join(plain)]
  if len(shapes) == 2:
    a, b = shapes
    pool += [
      f"{a.phrase()} {relation(a, b)} {b.phrase()}",
      f"{b.phrase()} {relation(b, a)} {a.phrase()}",
    ]
  pool.append(_join([f"{p} at the {where(s, image_size)}" for p, s in zip(phrases, shapes)]))
  pool.append(_join([f"{p} at the {where(s, image_size)}" for p, s in zip(plain, shapes)]))
  pool = list(dict.fromkeys(pool))  # distinct (always >= 4)
  order = rng.permutation(len(pool) - 1) + 1
  out = pool[:1] + [pool[i] for i in order]
  return [out[i % len(out)] for i in range(n)]


@dataclasses.dataclass(frozen=True)
class RetrievalFiles:
  """Paths of a synthetic image-text retrieval set (official Karpathy-style JSON arrays)."""

  image_root: str
  train: str
  val: str
  test: str

  def source(self, split: str) -> dict:
    """The image-kind source entry of a split ('train', 'val' or 'test')."""
    return {"type": "json", "path": getattr(self, split), "image_root": self.image_root}


def write_retrieval(
  out_dir: str | os.PathLike,
  n_train: int = 16,
  n_val: int = 8,
  n_test: int = 8,
  captions_per_image: int = 3,
  eval_captions: int = 5,
  image_size: int = 64,
  seed: int = TRAIN_SEED,
  world: Mapping[str, Any] | None = None,
) -> RetrievalFiles:
  """Writes images/<split>/NNNNNN.png and retrieval_{train,val,test}.json under out_dir.

  train: one entry {"image", "caption", "image_id"} per caption, `captions_per_image` per
  image, image_id an int unique per image; val/test: one entry {"image", "caption": [...]} per
  distinct image with `eval_captions` captions. `world`: other WorldConfig fields (e.g.
  max_shapes).
  """
  out_dir = os.fspath(out_dir)
  root, seen, paths = os.path.join(out_dir, "images"), set(), {}
  for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
    cfg = WorldConfig(**{**dict(world or {}), "image_size": image_size})
    world_split = ShapesWorld(cfg, seed=split_seed(seed, split))
    entries = []
    for k, (index, data, shapes) in enumerate(_scenes(world_split, n, seen)):
      rel = f"{split}/{k:06d}.png"
      _write_bytes(os.path.join(root, rel), data)
      rng = np.random.default_rng([world_split.seed, 11, index])
      if split == "train":
        caps = scene_captions(shapes, image_size, rng, captions_per_image)
        entries += [{"image": rel, "caption": c, "image_id": k} for c in caps]
      else:
        entries.append(
          {"image": rel, "caption": scene_captions(shapes, image_size, rng, eval_captions)}
        )
    paths[split] = _write_json(os.path.join(out_dir, f"retrieval_{split}.json"), entries)
  return RetrievalFiles(root, paths["train"], paths["val"], paths["test"])


# ----------------------------------------------------------------------------------------------
# Grounding (RefCOCO+-style)
# ----------------------------------------------------------------------------------------------

# Attribute sets a description may use, most specific first.
_DESCRIPTORS = (
  ("size", "colour", "shape"),
  ("colour", "shape"),
  ("size", "shape"),
  ("size", "colour"),
  ("colour",),
  ("shape",),
)


def _describe(s: Shape, attrs: tuple[str, ...]) -> str:
  words = [getattr(s, a) for a in ("size", "colour") if a in attrs]
  return "the " + " ".join(words + [s.shape if "shape" in attrs else "shape"])


def unique_descriptions(shapes: list[Shape], t: int) -> list[str]:
  """Descriptions ("the blue shape", "the large triangle", ...) that match shape t only."""
  target, out = shapes[t], []
  for attrs in _DESCRIPTORS:
    matches = [s for s in shapes if all(getattr(s, a) == getattr(target, a) for a in attrs)]
    if matches == [target]:
      out.append(_describe(target, attrs))
  return out


def referring_expressions(shapes: list[Shape], t: int) -> list[str]:
  """Expressions that identify shape t of a scene unambiguously, with true relations.

  The shortest unique description, the full one, and the shortest one related to the nearest
  other shape ("the small red circle to the left of the square"). Distinct (colour, shape)
  pairs in every scene make the full description always unique.
  """
  descs = unique_descriptions(shapes, t)
  shortest = min(descs, key=len)
  out = [shortest, descs[0]]
  a = shapes[t]
  others = [s for s in shapes if s is not a]
  if others:
    b = min(others, key=lambda s: np.hypot(a.centre[0] - s.centre[0], a.centre[1] - s.centre[1]))
    b_desc = min(unique_descriptions(shapes, shapes.index(b)), key=len)
    out.append(f"{shortest} {relation(a, b)} {b_desc}")
  return list(dict.fromkeys(out))


@dataclasses.dataclass(frozen=True)
class GroundingFiles:
  """Paths of a synthetic RefCOCO+-style grounding set."""

  image_root: str
  train: str
  val: str
  test: str  # testA and testB entries, mixed as in the official test file
  refs: str
  instances: str

  def source(self, split: str) -> dict:
    """The region-kind refcoco source entry of 'train', 'val', 'testA' or 'testB'."""
    path = self.test if split in ("testA", "testB") else getattr(self, split)
    return {
      "type": "refcoco",
      "path": path,
      "refs": self.refs,
      "instances": self.instances,
      "image_root": self.image_root,
      "split": split,
    }


_CATEGORY = {"circle": 1, "square": 2, "triangle": 3, "diamond": 4}


@dataclasses.dataclass
class _Tables:
  """What the grounding writer accumulates over the splits."""

  root: str
  images: list = dataclasses.field(default_factory=list)  # instances.json "images"
  anns: list = dataclasses.field(default_factory=list)  # instances.json "annotations"
  refs: list = dataclasses.field(default_factory=list)  # refs(unc).p
  entries: dict = dataclasses.field(default_factory=dict)  # split -> split-file entries


def _ref(ref_id, ann_id, image_id, split, shape, file_name, sents) -> dict:
  """One REFER ref."""
  return {
    "ref_id": ref_id,
    "ann_id": ann_id,
    "image_id": image_id,
    "split": split,
    "category_id": _CATEGORY[shape],
    "file_name": file_name,
    "sent_ids": list(range(len(sents))),
    "sentences": [
      {"sent": x, "raw": x, "tokens": x.split(), "sent_id": i} for i, x in enumerate(sents)
    ],
  }


def _grounding_split(world, n, split, seen, tables: _Tables, sentences_per_ref) -> None:
  """Writes one split's images and adds its images, annotations, refs and entries."""
  side = world.cfg.image_size
  for k, (index, data, shapes) in enumerate(_scenes(world, n, seen)):
    file_name = f"{split}/{k:06d}.png"
    _write_bytes(os.path.join(tables.root, file_name), data)
    image_id = len(tables.images) + 1
    tables.images.append({"id": image_id, "file_name": file_name, "width": side, "height": side})
    rng = np.random.default_rng([world.seed, 13, index])
    for t, s in enumerate(shapes):
      ann_id, ref_id, bb = len(tables.anns) + 1, len(tables.refs), [float(v) for v in s.bb]
      tables.anns.append(
        {
          "id": ann_id,
          "image_id": image_id,
          "bbox": bb,
          "area": bb[2] * bb[3],
          "category_id": _CATEGORY[s.shape],
          "iscrowd": 0,
        }
      )
      exprs = referring_expressions(shapes, t)
      pick = sorted(rng.choice(len(exprs), min(sentences_per_ref, len(exprs)), replace=False))
      sents = [exprs[i] for i in pick]
      tables.refs.append(_ref(ref_id, ann_id, image_id, split, s.shape, file_name, sents))
      tables.entries.setdefault(split, []).extend(
        {"image": file_name, "text": x, "ref_id": ref_id} for x in sents
      )


def write_grounding(
  out_dir: str | os.PathLike,
  n_train: int = 12,
  n_val: int = 4,
  n_testA: int = 4,
  n_testB: int = 4,
  sentences_per_ref: int = 2,
  image_size: int = 64,
  seed: int = TRAIN_SEED,
  world: Mapping[str, Any] | None = None,
) -> GroundingFiles:
  """Writes a RefCOCO+-style set under out_dir: images/<split>/NNNNNN.png, refcoco+_train.json,
  refcoco+_val.json, refcoco+_test.json (testA then testB entries), refs(unc).p, instances.json.

  Scenes hold 2-4 shapes; every shape is one ref (its exact tight box is the annotation) with
  up to `sentences_per_ref` expressions from `referring_expressions`, one split entry each.
  `world`: other WorldConfig fields (e.g. max_shapes).
  """
  out_dir = os.fspath(out_dir)
  tables = _Tables(os.path.join(out_dir, "images"))
  cfg = WorldConfig(**{"min_shapes": 2, **dict(world or {}), "image_size": image_size})
  seen: set[str] = set()
  for split, n in (("train", n_train), ("val", n_val), ("testA", n_testA), ("testB", n_testB)):
    world = ShapesWorld(cfg, seed=split_seed(seed, split))
    _grounding_split(world, n, split, seen, tables, sentences_per_ref)
  entries = tables.entries
  categories = [{"id": i, "name": name} for name, i in _CATEGORY.items()]
  instances = _write_json(
    os.path.join(out_dir, "instances.json"),
    {"images": tables.images, "annotations": tables.anns, "categories": categories},
  )
  refs_path = os.path.join(out_dir, "refs(unc).p")
  with open(refs_path, "wb") as f:
    pickle.dump(tables.refs, f, protocol=2)
  files = {
    name: _write_json(os.path.join(out_dir, f"refcoco+_{name}.json"), rows)
    for name, rows in (
      ("train", entries.get("train", [])),
      ("val", entries.get("val", [])),
      ("test", entries.get("testA", []) + entries.get("testB", [])),
    )
  }
  return GroundingFiles(
    tables.root, files["train"], files["val"], files["test"], refs_path, instances
  )


# ----------------------------------------------------------------------------------------------
# Video-text retrieval (MSRVTT-style)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoRetrievalFiles:
  """Paths of a synthetic MSRVTT-style video retrieval set."""

  image_root: str
  train: str
  test: str

  def source(self, split: str) -> dict:
    """The video-kind json source entry of 'train' or 'test' (keys: VIDEO_KEYS)."""
    return {
      "type": "json",
      "path": getattr(self, split),
      "image_root": self.image_root,
      **VIDEO_KEYS,
    }


def write_video_retrieval(
  out_dir: str | os.PathLike,
  n_train: int = 8,
  n_test: int = 4,
  image_size: int = 64,
  seed: int = TRAIN_SEED,
) -> VideoRetrievalFiles:
  """Writes videos/<split>/NNNNNN.json (a list of base64 PNG frames: one shape moving in one
  direction) and video_{train,test}.json under out_dir.

  train: one entry {"video_id", "video", "caption"} per caption (2 per clip); test: one entry
  per clip with its captions as a list.
  """
  out_dir = os.fspath(out_dir)
  root, seen, paths = os.path.join(out_dir, "videos"), set(), {}
  cfg = WorldConfig(image_size=image_size, multi_clip_prob=0.0)
  for split, n in (("train", n_train), ("test", n_test)):
    world, entries, index, k = ShapesWorld(cfg, seed=split_seed(seed, split)), [], 0, 0
    while k < n:
      rec = world.record(F.VIDEO, index)
      index += 1
      frames = [base64.b64encode(fr).decode("ascii") for fr in rec["clips"][0]]
      digest = hashlib.sha1("".join(frames).encode()).hexdigest()
      if digest in seen:
        continue
      seen.add(digest)
      rel, vid = f"{split}/{k:06d}.json", f"{split}-video{k}"
      k += 1
      _write_json(os.path.join(root, rel), frames)
      if split == "train":
        entries += [{"video_id": vid, "video": rel, "caption": c} for c in rec["captions"]]
      else:
        entries.append({"video_id": vid, "video": rel, "caption": rec["captions"]})
    paths[split] = _write_json(os.path.join(out_dir, f"video_{split}.json"), entries)
  return VideoRetrievalFiles(root, paths["train"], paths["test"])
