"""Canonical records <-> TFDS ArrayRecord datasets, written and read without TensorFlow.

Writing uses a `tfds.core.GeneratorBasedBuilder` per kind (`file_format="array_record"`),
reading uses the TFDS ArrayRecord data source (`builder.as_data_source()`), which decodes
examples to NumPy without TensorFlow. Two TFDS limits shape the feature layout:

* `tfds.features.Image` and nested `Sequence`s (ragged rank >= 2) need TensorFlow at write time,
  so images are stored as encoded bytes in a scalar `Tensor(dtype=object)` and every nested list
  is flattened with explicit per-row counts (elem captions, elem attributes, video clips);
* `tf.train.Example` floats are float32, so boxes are stored as the bit patterns of their
  float64 values (`int64 [N, 4]`) to round-trip exactly.

Examples keep their input order (`disable_shuffling`), so index i of the dataset is the i-th
record written. The dataset directory is `<out_dir>/x2vlm_<kind>/1.0.0/`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import features as F

TFDS = tfds.features
VERSION = "1.0.0"
_BYTES = dict(dtype=np.object_)  # a variable-length byte string (encoded image / frame)


def features_for(kind: str) -> TFDS.FeaturesDict:
  """The flat TFDS features dict of one kind (no nested Sequence: see module docstring)."""
  common = {"id": TFDS.Text(), "captions": TFDS.Sequence(TFDS.Text())}
  image_id = {"image_id": TFDS.Text()}  # "" when the record has none
  if kind == F.IMAGE:
    return TFDS.FeaturesDict({**common, **image_id, "image": TFDS.Tensor(shape=(), **_BYTES)})
  if kind == F.REGION:
    return TFDS.FeaturesDict(
      {
        **common,
        "image": TFDS.Tensor(shape=(), **_BYTES),
        "elem_bb_bits": TFDS.Tensor(shape=(None, 4), dtype=np.int64),  # float64 bits, [E, 4]
        "elem_caption_counts": TFDS.Tensor(shape=(None,), dtype=np.int32),  # [E]
        "elem_captions": TFDS.Sequence(TFDS.Text()),  # all elem captions, flattened
        "elem_attribute_counts": TFDS.Tensor(shape=(None,), dtype=np.int32),  # [E]
        "elem_attributes": TFDS.Sequence(TFDS.Text()),
      }
    )
  if kind == F.VIDEO:
    return TFDS.FeaturesDict(
      {
        **common,
        **image_id,
        "frames": TFDS.Tensor(shape=(None,), **_BYTES),  # all frames of all clips, flattened
        "clip_lengths": TFDS.Tensor(shape=(None,), dtype=np.int32),  # [n_clips]
        "is_continuous": TFDS.Tensor(shape=(), dtype=np.bool_),
      }
    )
  raise ValueError(f"unknown kind {kind!r}; expected one of {F.KINDS}")


def to_example(record: dict) -> dict[str, Any]:
  """Canonical record -> TFDS example dict of its kind."""
  kind = record["kind"]
  ex = {"id": record["id"], "captions": list(record["captions"])}
  if kind != F.REGION:
    ex["image_id"] = record.get("image_id") or ""
  if kind == F.IMAGE:
    ex["image"] = bytes(record["image"])
  elif kind == F.REGION:
    elems = record["elems"]
    ex["image"] = bytes(record["image"])
    bb = np.asarray([e["bb"] for e in elems], np.float64).reshape(len(elems), 4)  # [E, 4]
    ex["elem_bb_bits"] = bb.view(np.int64)
    ex["elem_caption_counts"] = np.asarray([len(e["captions"]) for e in elems], np.int32)
    ex["elem_captions"] = [c for e in elems for c in e["captions"]]
    ex["elem_attribute_counts"] = np.asarray([len(e["attributes"]) for e in elems], np.int32)
    ex["elem_attributes"] = [a for e in elems for a in e["attributes"]]
  elif kind == F.VIDEO:
    ex["frames"] = np.asarray(
      [bytes(fr) for clip in record["clips"] for fr in clip] or [], dtype=object
    )
    ex["clip_lengths"] = np.asarray([len(c) for c in record["clips"]], np.int32)
    ex["is_continuous"] = bool(record["is_continuous"])
  else:
    raise ValueError(f"unknown kind {kind!r}")
  return ex


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _split(flat: list, counts) -> list[list]:
  out, pos = [], 0
  for n in counts:
    out.append(flat[pos : pos + int(n)])
    pos += int(n)
  return out


def from_example(kind: str, ex: dict[str, Any]) -> dict:
  """TFDS example (as decoded by the data source) -> canonical record."""
  record: dict[str, Any] = {
    "kind": kind,
    "id": _text(ex["id"]),
    "captions": [_text(c) for c in ex["captions"]],
  }
  if _text(ex.get("image_id", b"")):  # datasets written before image ids have no such feature
    record["image_id"] = _text(ex["image_id"])
  if kind == F.IMAGE:
    record["image"] = bytes(ex["image"])
  elif kind == F.REGION:
    record["image"] = bytes(ex["image"])
    bb = np.asarray(ex["elem_bb_bits"], np.int64).reshape(-1, 4).view(np.float64)  # [E, 4]
    caps = _split([_text(c) for c in ex["elem_captions"]], ex["elem_caption_counts"])
    attrs = _split([_text(a) for a in ex["elem_attributes"]], ex["elem_attribute_counts"])
    record["elems"] = [
      {"bb": [float(v) for v in b], "captions": c, "attributes": a}
      for b, c, a in zip(bb, caps, attrs)
    ]
  elif kind == F.VIDEO:
    record["clips"] = _split([bytes(fr) for fr in ex["frames"]], ex["clip_lengths"])
    record["is_continuous"] = bool(ex["is_continuous"])
  return record


def _builder_class(kind: str):
  """A GeneratorBasedBuilder writing the records handed to it (never registered globally)."""

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes canonical records of one kind; set `self.records` before `download_and_prepare`."""

    name = f"x2vlm_{kind}"
    VERSION = tfds.core.Version(VERSION)
    records: Iterable[dict] = ()
    split: str = "train"
    # TFDS looks for checksum files next to the builder's source via `importlib_resources`,
    # which is not installed (it comes with TensorFlow); nothing is downloaded, so opt out.
    code_path = None
    url_infos = None

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=features_for(kind),
        disable_shuffling=True,
        description=f"x2vlm-jax canonical {kind} records (see docs/data.md)",
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {self.split: self._generate_examples()}

    def _generate_examples(self):
      for i, record in enumerate(self.records):
        if record["kind"] != kind:
          raise ValueError(f"{record['id']}: a {record['kind']!r} record in a {kind!r} dataset")
        yield i, to_example(record)

  return Builder


_BUILDERS = {k: _builder_class(k) for k in F.KINDS}


def write(
  records: Iterable[dict], kind: str, out_dir: str | os.PathLike, split: str = "train"
) -> str:
  """Writes canonical records of `kind` as an ArrayRecord dataset; returns the dataset dir.

  `records` may be a lazy generator (it is consumed once). Raises if the dataset exists.
  """
  builder = _BUILDERS[kind](data_dir=os.fspath(out_dir), file_format="array_record")
  if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise FileExistsError(f"{builder.data_dir} already holds a dataset")
  builder.records, builder.split = records, split
  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:  # keep TFDS' download folders out of out_dir
    builder.download_and_prepare(download_dir=tmp)
  return os.fspath(builder.data_dir)


def find_dataset_dir(path: str | os.PathLike, max_depth: int = 3) -> str | None:
  """The dataset dir (holding `dataset_info.json`) at or below `path`, else None."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    return None
  found = []
  base = path.rstrip(os.sep).count(os.sep)
  for root, dirs, files in os.walk(path):
    if "dataset_info.json" in files and any(".array_record" in f for f in files):
      found.append(root)
    if root.count(os.sep) - base >= max_depth:
      dirs[:] = []
    dirs.sort()
  if len(found) > 1:
    raise ValueError(f"{path} holds several ArrayRecord datasets: {found}; pass one of them")
  return found[0] if found else None


class ArrayRecordSource:
  """grain `RandomAccessDataSource` of canonical records from an ArrayRecord dataset dir.

  The TFDS data source is opened lazily (and dropped when pickled), so instances can be sent
  to grain worker processes.
  """

  def __init__(self, path: str | os.PathLike, split: str = "train"):
    self.dataset_dir = find_dataset_dir(path)
    if self.dataset_dir is None:
      raise FileNotFoundError(f"{path}: no ArrayRecord dataset (dataset_info.json) found")
    self.split = split
    builder = tfds.builder_from_directory(self.dataset_dir)
    name = builder.info.name
    kind = name[len("x2vlm_") :] if name.startswith("x2vlm_") else None
    if kind not in F.KINDS:
      raise ValueError(f"{self.dataset_dir}: dataset {name!r} is not an x2vlm_<kind> dataset")
    if split not in builder.info.splits:
      raise ValueError(f"{self.dataset_dir}: no split {split!r} (has {list(builder.info.splits)})")
    self.kind = kind
    self._len = builder.info.splits[split].num_examples
    self._ds = None

  def _source(self):
    if self._ds is None:
      self._ds = tfds.builder_from_directory(self.dataset_dir).as_data_source(split=self.split)
    return self._ds

  def __getstate__(self):
    return {**self.__dict__, "_ds": None}

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return f"ArrayRecordSource(kind={self.kind!r}, dir={self.dataset_dir!r}, records={len(self)})"

  def location(self, i: int) -> tuple[str, int]:
    """(dataset dir, 0-based example index) of record i."""
    return self.dataset_dir, int(i)

  def __getitem__(self, i: int) -> dict:
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    return from_example(self.kind, self._source()[int(i) % len(self)])

  def __getitems__(self, indices) -> list[dict]:
    return [from_example(self.kind, ex) for ex in self._source().__getitems__(list(indices))]
