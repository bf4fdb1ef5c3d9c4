"""Writes MVPTR pre-training data in the Oscar/VinVL layout that `mvptr_oscar.OscarSource` and
the official reader take (the layout: `mvptr_oscar`'s docstring).

One writer holds one dataset name (one feature and label directory, not chunked) and writes,
under its root: `corpus.tsv`, `features/<dataset>/features.tsv`, `labels/<dataset>/
predictions_gt.tsv` (each with the `imageid2idx.json` row map where the reader needs one and
the official `.lineidx` byte offsets), `sg.json`, `id2phrase.json` and the spec `oscar.yaml`
(written as JSON, which YAML loaders read). Used by the synthetic data (`mvptr_synthetic.py`)
and the converter (`tools/mvptr_convert.py`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from data_pipelines import mvptr_regions
from data_pipelines.mvptr_phrases import PhraseTable, as_tuple

SPEC_NAME = "oscar.yaml"


def _write_tsv(path: str, rows: list[str]) -> None:
  """TSV rows + the official `.lineidx` (decimal byte offset of each row, one per line)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = [(r + "\n").encode("utf-8") for r in rows]
  with open(path, "wb") as f:
    f.writelines(data)
  offsets = np.cumsum([0] + [len(d) for d in data])[:-1]
  with open(os.path.splitext(path)[0] + ".lineidx", "w") as f:
    f.writelines(f"{int(o)}\n" for o in offsets)


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


class LayoutWriter:
  """Collects images and captions of one dataset, then `close()` writes the layout.

  Args:
    root: output directory.
    dataset: dataset name (no "_": keys are "<dataset>_<image id>").
    vocab: the phrase vocabulary (tuples of words -> ids); written as id2phrase.json.
    phrase_ids: True writes the sg phrases as ids (the official pre-training file), False as
      word lists (mapped by the reader).
  """

  def __init__(self, root: str, dataset: str, vocab: PhraseTable, phrase_ids: bool = True):
    if "_" in dataset or not dataset:
      raise ValueError(f"dataset name {dataset!r} must be non-empty and without '_'")
    self.root, self.dataset, self.vocab, self.phrase_ids = root, dataset, vocab, phrase_ids
    self._features, self._labels, self._corpus, self._sg = [], [], [], []
    self._images: set[str] = set()
    self.dim: int | None = None
    self.dropped_phrases = 0

  def add_image(self, image_id: str, vectors, classes, boxes_xyxy, width: int, height: int):
    """One image: region vectors [n, dim] (features + box values) and its detector classes."""
    image_id = str(image_id)
    if "_" in image_id or "\t" in image_id or image_id in self._images:
      raise ValueError(f"image id {image_id!r}: duplicate, or contains '_' or a tab")
    v = np.asarray(vectors, np.float32)
    if self.dim is None:
      self.dim = int(v.shape[1])
    if v.ndim != 2 or v.shape[1] != self.dim:
      raise ValueError(f"image {image_id}: vectors {v.shape}, expected [n, {self.dim}]")
    self._images.add(image_id)
    self._features.append(mvptr_regions.encode_feature_row(image_id, v))
    objects = [
      {"class": str(c), "rect": [float(x) for x in b], "conf": 1.0}
      for c, b in zip(classes, np.asarray(boxes_xyxy, np.float64).reshape(-1, 4))
    ]
    info = {"objects": objects, "image_h": int(height), "image_w": int(width)}
    self._labels.append(f"{image_id}\t{json.dumps(info)}")

  def add_caption(self, image_id: str, caption: str, phrases) -> None:
    """One corpus line of an image already added; `phrases` are word tuples (those outside
    the vocabulary are dropped and counted) or ids."""
    image_id = str(image_id)
    if image_id not in self._images:
      raise ValueError(f"caption for unknown image {image_id!r}")
    text = " ".join(str(caption).split())  # no tab or newline may reach the TSV
    key = f"{self.dataset}_{image_id}"
    self._corpus.append(f"{key}\t{key}\t{text}")
    out = []
    for p in phrases:
      if isinstance(p, (int, np.integer)):
        out.append(int(p))
        continue
      words = tuple(p) if isinstance(p, tuple) else as_tuple(p)
      if words not in self.vocab.tuple_to_id:
        self.dropped_phrases += 1
      elif self.phrase_ids:
        out.append(self.vocab.tuple_to_id[words])
      else:
        out.append(list(words))
    self._sg.append([out, {}, key])

  def close(self) -> str:
    """Writes every file; returns the spec path."""
    ds, root = self.dataset, self.root
    index = {row.split("\t", 1)[0]: r for r, row in enumerate(self._features)}
    _write_tsv(os.path.join(root, "features", ds, "features.tsv"), self._features)
    _write_json(os.path.join(root, "features", ds, "imageid2idx.json"), index)
    _write_tsv(os.path.join(root, "labels", ds, "predictions_gt.tsv"), self._labels)
    _write_json(os.path.join(root, "labels", ds, "imageid2idx.json"), index)
    _write_tsv(os.path.join(root, "corpus.tsv"), self._corpus)
    _write_json(os.path.join(root, "sg.json"), self._sg)
    _write_json(os.path.join(root, "id2phrase.json"), self.vocab.id2phrase())
    spec = {
      "corpus_file": "corpus.tsv",
      "corpus": ds,
      "image_feature_path": {ds: f"features/{ds}"},
      "image_label_path": {ds: f"labels/{ds}"},
      "sg_file": "sg.json",
      "id2phrase_file": "id2phrase.json",
      "phrase_vocab_size": sum(i >= 30522 for i in self.vocab.ids),
      "img_feature_dim": self.dim or 2054,
    }
    path = os.path.join(root, SPEC_NAME)
    _write_json(path, spec)
    return path
