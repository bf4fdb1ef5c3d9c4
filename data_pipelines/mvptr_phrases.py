"""MVPTR phrase vocabulary (`id2phrase` JSON) and the scene-graph phrase file of a corpus.

`id2phrase_new.json` maps "<id>" -> the words of a scene-graph tuple: objects [obj], attributes
[obj, attr], relations [subj, rel, obj]; single-word objects carry the BERT word id of the word,
the others ids >= 30522 (MVPTR_REFERENCE.md section 1). The official readers invert it into
tuple -> id and keep a caption's tuple only when it is in the vocabulary
(`run_retrieval.py::get_caption_phrase`).

The pre-training sg file (`sg_file` of the spec) is one JSON list aligned with the corpus lines;
entry r = [phrases, {word index: [phrase index]}, label key of line r]. Its phrases are ids (the
official pre-training file) or word tuples (lists, or "_"-joined strings as the fine-tuning
files), mapped through the vocabulary here. The whole file is read once into flat int arrays
(compact, cheap to pickle into worker processes); a malformed entry is remembered and raised as
`SkipRecord` when its record is read. The word -> phrase map serves only the code's masking of
phrases linked to masked words, which is not built (docs/mvptr.md#data).
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np

from data_pipelines import features as F

DATASET_ALIASES = {"cc": "googlecc"}  # the official reader's one renaming of a key's dataset


def label_key_crc(key: str) -> int:
  """crc32 of a label key: each sg entry's key, compared with its corpus line's when read."""
  return zlib.crc32(key.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class PhraseTable:
  """The phrase vocabulary: tuple of words -> id, and the set of ids."""

  tuple_to_id: dict[tuple[str, ...], int]

  @classmethod
  def from_id2phrase(cls, id2phrase: dict) -> "PhraseTable":
    out = {}
    for k, words in id2phrase.items():
      if isinstance(words, str):
        words = [words]
      if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
        raise ValueError(f"id2phrase entry {k!r}: {words!r} is not a list of words")
      out[tuple(words)] = int(k)
    return cls(out)

  @classmethod
  def load(cls, path: str) -> "PhraseTable":
    with open(path) as f:
      return cls.from_id2phrase(json.load(f))

  @property
  def ids(self) -> frozenset[int]:
    return frozenset(self.tuple_to_id.values())

  def id2phrase(self) -> dict[str, list[str]]:
    """The JSON form, ids in increasing order."""
    return {str(i): list(t) for t, i in sorted(self.tuple_to_id.items(), key=lambda kv: kv[1])}


def as_tuple(item) -> tuple[str, ...] | None:
  """A phrase given as words: ["man", "ride"] or "man_ride" -> ("man", "ride"); else None."""
  if isinstance(item, str):
    return tuple(item.split("_"))
  if isinstance(item, list) and item and all(isinstance(w, str) for w in item):
    return tuple(item)
  return None


class SgIndex:
  """The sg file as flat arrays: the phrase ids of corpus row r, its label key's crc and
  dataset, and the problem of a malformed entry."""

  def __init__(self, entries: list, vocab: PhraseTable | None, path: str = "sg_file"):
    ids, offsets, crcs, self.bad, self.dropped = [], [0], [], {}, 0
    names: dict[str, int] = {}  # dataset name of a label key -> its code
    dataset, qa = [], []
    known = vocab.ids if vocab is not None else None
    for r, entry in enumerate(entries):
      got, key = self._entry(r, entry, vocab, known, path)
      ids.extend(got)
      offsets.append(len(ids))
      crcs.append(label_key_crc(key) if key is not None else -1)
      parts = key.split("_") if key is not None else [""]
      dataset.append(names.setdefault(DATASET_ALIASES.get(parts[0], parts[0]), len(names)))
      qa.append("qa" in parts)
    self.ids = np.asarray(ids, np.int32)  # [total phrases]
    self.offsets = np.asarray(offsets, np.int64)  # [rows + 1]
    self.crcs = np.asarray(crcs, np.int64)  # [rows]; -1: no key
    self._dataset = np.asarray(dataset, np.int32)  # [rows] code of the key's dataset
    self._names = list(names)  # code -> dataset name
    self._qa = np.asarray(qa, bool)  # [rows]

  def _entry(self, r, entry, vocab, known, path) -> tuple[list[int], str | None]:
    where = f"{path}[{r}]"
    if not isinstance(entry, list) or not entry or not isinstance(entry[0], list):
      self.bad[r] = (where, "need [phrases, word map, label key]")
      return [], None
    key = entry[2] if len(entry) >= 3 and isinstance(entry[2], str) else None
    items = entry[0]
    if all(type(i) is int for i in items):  # the official pre-training file: ids only
      if known is None and all(i >= 0 for i in items):
        return items, key
      if known is not None and known.issuperset(items):
        return items, key
    out = []
    for k, item in enumerate(items):
      if isinstance(item, int) and not isinstance(item, bool):
        if item < 0 or (known is not None and item not in known):
          self.bad[r] = (f"{where}.phrases[{k}]", f"phrase id {item} not in the vocabulary")
          return [], key
        out.append(item)
        continue
      words = as_tuple(item)
      if words is None:
        self.bad[r] = (f"{where}.phrases[{k}]", f"{item!r} is neither an id nor words")
        return [], key
      if vocab is None:
        raise ValueError(f"{where}: word tuples need the phrase vocabulary (id2phrase_file)")
      if words in vocab.tuple_to_id:
        out.append(vocab.tuple_to_id[words])
      else:
        self.dropped += 1  # the official readers keep only tuples of the vocabulary
    return out, key

  def __len__(self) -> int:
    return len(self.crcs)

  def exclusion(self, r: int, datasets) -> str | None:
    """Why corpus row r is not a record ('qa' line, 'other_dataset'), else None."""
    if r in self.bad or self.crcs[r] < 0:
      return None  # kept, and reported as a bad record when read
    if self._qa[r]:
      return "qa"
    if self._names[self._dataset[r]] not in datasets:
      return "other_dataset"
    return None

  def phrases(self, r: int, label_key: str, record_id: str) -> np.ndarray:
    """int32 phrase ids of corpus row r; `SkipRecord` for a malformed or misaligned entry."""
    if r in self.bad:
      field, detail = self.bad[r]
      raise F.SkipRecord("bad_field_type", record_id, field, detail)
    if self.crcs[r] != label_key_crc(label_key):
      raise F.SkipRecord(
        "bad_field_type", record_id, f"sg_file[{r}]", f"entry is not for label key {label_key!r}"
      )
    return self.ids[self.offsets[r] : self.offsets[r + 1]].copy()


def load_sg_file(path: str, vocab: PhraseTable | None) -> SgIndex:
  """SgIndex of an sg JSON file (ValueError if it is not one JSON list)."""
  try:
    with open(path) as f:
      entries = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a JSON file: {e}") from None
  if not isinstance(entries, list):
    raise ValueError(f"{path}: holds a JSON {type(entries).__name__}, not a list of entries")
  return SgIndex(entries, vocab, "sg_file")
