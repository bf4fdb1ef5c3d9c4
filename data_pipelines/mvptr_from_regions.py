"""Our region records (`features.py`: image, whole-image captions, elems with boxes, captions
and attributes) plus any vision tower's region features -> MVPTR data in the Oscar/VinVL layout
(`mvptr_oscar_write.LayoutWriter`). The command line is `tools/mvptr_convert.py`.

Per record (one image; layout image id = its position among the written images, the record ids
kept in `image_ids.json`):
- regions: the elems whose box passes the crop rule (`checks.box_ok`, exact), in elem order;
  their vectors = the features given for the elems ([n_elems, F], one row per elem, from
  `features_fn(record, boxes_xyxy, width, height)` or `<image id or record id>.npy` in a
  directory) followed by the 6 box values;
- tags (detector classes): the first caption of each kept "object" elem, i.e. one of at most
  `max_object_words` words (longer captions are region phrases, not classes);
- corpus lines: the record's whole-image captions;
- phrases per caption (a rule-based stand-in for the SPICE parser): an object (name,) when the
  name occurs in the cleaned caption, an attribute (name, word) for each word of an attribute
  that occurs right before the name ("large red circle" -> (circle, large), (circle, red)).
  Relations are not extracted. Tuples outside the vocabulary are dropped; without a given
  vocabulary one is built from the tuples seen in >= min_count captions (single-word objects of
  one word piece -> their word id, the rest ids from 30522 in sorted order);
- phrase-grounding targets (`mvptr_grounding_file`, `grounding.json`): a written phrase whose
  object names exactly one kept object elem of the record is grounded to that elem's region row
  (an attribute tuple to the elem it describes); a name shared by several elems is ambiguous
  (-1). So a grounding data set in our region records (Flickr30K Entities or RefCOCO boxes with
  their phrases, VG objects) gives `mvptr_grounding` its targets.
A record that cannot be read, has no image size, no usable box or features of the wrong shape is
skipped and reported (`Problem`), like the other converters.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Callable

import numpy as np

from data_pipelines import checks, mvptr_regions
from data_pipelines import features as F
from data_pipelines.mvptr_grounding_file import write_grounding
from data_pipelines.mvptr_oscar_write import LayoutWriter
from data_pipelines.mvptr_phrases import PhraseTable
from data_pipelines.text_ops import pre_caption
from data_pipelines.tools.validate import Problem

FIRST_PHRASE_ID = 30522


def _clean(text: str) -> str:
  try:
    return " " + pre_caption(text, 10_000) + " "
  except F.SkipRecord:
    return " "


def object_elems(record: dict, max_object_words: int) -> list[tuple[int, str]]:
  """(elem index, cleaned object name) of the elems whose first caption is an object name."""
  out = []
  for i, e in enumerate(record["elems"]):
    name = _clean(e["captions"][0]).strip() if e["captions"] else ""
    if name and len(name.split()) <= max_object_words:
      out.append((i, name))
  return out


def caption_tuples(caption: str, record: dict, max_object_words: int = 3) -> list[tuple]:
  """The object and attribute tuples of one caption (module docstring)."""
  text, out = _clean(caption), []
  for i, name in object_elems(record, max_object_words):
    if f" {name} " not in text:
      continue
    out.append((name,))
    for attr in record["elems"][i].get("attributes") or []:
      attr = _clean(attr).strip()
      if attr and f" {attr} {name} " in text:
        out.extend((name, w) for w in attr.split())
  return list(dict.fromkeys(out))


def build_vocab(tuples_per_caption, tokenizer, min_count: int = 1) -> PhraseTable:
  """Vocabulary of the tuples seen in >= min_count captions (module docstring)."""
  counts = collections.Counter(t for ts in tuples_per_caption for t in set(ts))
  table, rest = {}, []
  for t in sorted(t for t, c in counts.items() if c >= min_count):
    ids = tokenizer.pieces(t[0])[0] if len(t) == 1 and " " not in t[0] else []
    if len(ids) == 1:
      table[t] = int(ids[0])
    else:
      rest.append(t)
  table.update({t: FIRST_PHRASE_ID + k for k, t in enumerate(rest)})
  return PhraseTable(table)


def npy_features(directory: str) -> Callable:
  """features_fn reading `<image id or record id>.npy` ([n_elems, F]) from a directory."""

  def load(record, boxes_xyxy, width, height):
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(record.get("image_id") or record["id"]))
    path = os.path.join(directory, f"{name}.npy")
    if not os.path.isfile(path):
      raise F.SkipRecord("missing_image", record["id"], "features", f"no {path}")
    return np.load(path)

  return load


def _name_rows(objects: dict[int, str], keep: list[int]) -> dict[str, int]:
  """object name -> region row (position in `keep`) of the one kept elem with that name; a name
  several kept elems share maps to -1 (ambiguous)."""
  rows: dict[str, int] = {}
  for row, j in enumerate(keep):
    if j in objects:
      name = objects[j]
      rows[name] = -1 if name in rows else row
  return rows


def _regions(record: dict, features_fn: Callable) -> tuple[np.ndarray, list[int], list, tuple]:
  """(region vectors, kept elem indices, their xyxy boxes, (width, height)) of one record."""
  rid = record["id"]
  width, height = checks.image_size(record["image"], rid, "image")
  keep = [i for i, e in enumerate(record["elems"]) if checks.box_ok(e["bb"], width, height, True)]
  if not keep:
    raise F.SkipRecord("bad_box", rid, "elems", f"no box inside the {width}x{height} image")
  xyxy = [[x, y, x + w, y + h] for x, y, w, h in (record["elems"][i]["bb"] for i in keep)]
  all_xyxy = [[x, y, x + w, y + h] for x, y, w, h in (e["bb"] for e in record["elems"])]
  feats = np.asarray(features_fn(record, np.asarray(all_xyxy, np.float64), width, height))
  if feats.ndim != 2 or feats.shape[0] != len(record["elems"]):
    raise F.SkipRecord(
      "corrupt_image", rid, "features", f"{feats.shape} for {len(record['elems'])} elems"
    )
  vectors = mvptr_regions.region_vectors(feats[keep], xyxy, width, height)
  return vectors, keep, xyxy, (width, height)


def convert_records(
  source,
  out_dir: str,
  features_fn: Callable,
  tokenizer,
  vocab: PhraseTable | None = None,
  dataset: str = "regions",
  min_count: int = 1,
  max_object_words: int = 3,
  log=None,
) -> dict:
  """Converts a random-access source of region records (with `location(i)`); returns a JSON-able
  summary: spec path, images / captions written, skipped {reason: n}, dropped phrases."""
  log = log or (lambda p: None)
  problems, good = [], []
  for i in range(len(source)):
    path, pos = source.location(i)
    try:
      record = source[i]
      good.append((i, record, _regions(record, features_fn)))
    except F.SkipRecord as e:
      problems.append(Problem(f"{path}:{pos}", e.reason, e.field, e.detail, e.record_id))
      log(problems[-1])
  tuples = {
    (i, c): caption_tuples(c, r, max_object_words) for i, r, _ in good for c in r["captions"]
  }
  vocab = vocab or build_vocab(tuples.values(), tokenizer, min_count)
  writer, ids, captions = LayoutWriter(out_dir, dataset, vocab), {}, 0
  objects = {i: dict(object_elems(r, max_object_words)) for i, r, _ in good}
  grounding = []
  for k, (i, record, (vectors, keep, xyxy, size)) in enumerate(good):
    ids[str(k)] = record["id"]
    classes = [objects[i][j] for j in keep if j in objects[i]]
    boxes = [b for j, b in zip(keep, xyxy) if j in objects[i]]
    writer.add_image(str(k), vectors, classes, boxes, *size)
    rows = _name_rows(objects[i], keep)
    for c in record["captions"]:
      writer.add_caption(str(k), c, tuples[(i, c)])
      kept = [t for t in tuples[(i, c)] if t in vocab.tuple_to_id]  # what the writer keeps
      grounding.append([rows.get(t[0], -1) for t in kept])
      captions += 1
  spec = writer.close()
  write_grounding(out_dir, grounding)
  with open(os.path.join(out_dir, "image_ids.json"), "w") as f:
    json.dump(ids, f)
  skipped = collections.Counter(p.reason for p in problems)
  return {
    "spec": spec,
    "images": len(good),
    "captions": captions,
    "skipped": {r: skipped[r] for r in F.SKIP_REASONS if skipped[r]},
    "dropped_phrases": writer.dropped_phrases,
    "grounded_phrases": sum(t >= 0 for line in grounding for t in line),
    "phrases": len(vocab.tuple_to_id),
  }
