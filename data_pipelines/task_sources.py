"""Readers of the official VQA, NLVR2 and video-QA files (source types 'vqa', 'nlvr2',
'video_qa'; docs/data.md#question-answering-and-nlvr2-files).

Each is a random-access source of canonical records (`features.py`) of the image or video kind
with the task's extra keys, read by the task examples (`task_examples.py`) and the evaluation
sets (`x2vlm_jax/evaluators/qa_data.py`):

  vqa       JSON arrays of {question_id, image, question, answer, [dataset]}: `answer` the
            annotators' answers (a list; each distinct answer weighs its share of the list) or
            one string (Visual Genome, `dataset: vg`: weight 0.5); test entries may lack it.
            `image` under image_root (`dataset` vqa or absent), vg_root (vg) or as given (gqa).
            Record: image, captions [question], answers, answer_weights, question_id,
            annotator_answers (the raw list, for the accuracy).
  nlvr2     JSON arrays of {images: [left, right], sentence, label: "True"/"False"/bool}, paths
            under image_root. Record: image (left), pair_image (right), captions [sentence],
            label 1 (true) / 0.
  video_qa  JSON lines of {video_id, question, answer}, the answer vocabulary `ans2label`
            (answer -> class), and one JSON file of base64 frames per video under frames_root,
            named as MSRVTT-QA (`video_<N>.json` for video id `video<N>`) or MSVD-QA
            (`<video_id>.json`). Record: clips [frames], captions [question], answer, label (the
            class, -100 outside the vocabulary).

Record ids: the question id (VQA), else "<file basename>:<1-based entry or line>". A missing
image or frame file raises SkipRecord('missing_image'), a malformed entry 'bad_field_type'.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import os

from data_pipelines import features as F
from data_pipelines.sources import array_entries, list_files


class _Entries:
  """The entries of JSON-array files (or, with `lines`, JSON-lines files), in file order."""

  def __init__(self, path, lines: bool = False):
    self.files, self._items = list_files(path), []
    for f in self.files:
      if lines:
        with open(f, encoding="utf-8") as fh:
          rows = [(n, line) for n, line in enumerate(fh, 1) if line.strip()]
        self._items += [(f, n, line.encode("utf-8")) for n, line in rows]
      else:
        buf, offsets = array_entries(f)
        self._items += [
          (f, j + 1, buf[offsets[j] : offsets[j + 1]].tobytes()) for j in range(len(offsets) - 1)
        ]

  def __len__(self) -> int:
    return len(self._items)

  def get(self, i: int) -> tuple[dict, str, str]:
    """(entry, record id, directory of its file); SkipRecord for an entry that is no object."""
    path, n, raw = self._items[i]
    rid = f"{os.path.basename(path)}:{n}"
    try:
      obj = json.loads(raw)
    except ValueError:
      raise F.SkipRecord("bad_json", rid, "entry") from None
    if not isinstance(obj, dict):
      raise F.SkipRecord("bad_json", rid, "entry", f"is {type(obj).__name__}")
    return obj, rid, os.path.dirname(path)


def _read(path: str, rid: str, field: str) -> bytes:
  if not os.path.isfile(path):
    raise F.SkipRecord("missing_image", rid, field, path)
  with open(path, "rb") as f:
    return f.read()


def _text(obj: dict, key: str, rid: str) -> str:
  value = obj.get(key)
  if not isinstance(value, str):
    raise F.SkipRecord("bad_field_type", rid, key, f"need a string, got {type(value).__name__}")
  return value


def answer_weights(answer, dataset: str | None) -> tuple[list[str], list[float]]:
  """(distinct answers, weights) of a VQA entry's `answer`, as the official training set: a
  list of annotator answers -> each distinct one weighs count / len(list); Visual Genome's one
  answer weighs 0.5; another single string weighs 1; nothing -> ([], [])."""
  if answer is None:
    return [], []
  if isinstance(answer, str):
    return [answer], [0.5 if dataset == "vg" else 1.0]
  if not isinstance(answer, (list, tuple)) or not all(isinstance(a, str) for a in answer):
    raise ValueError("answer must be a string or a list of strings")
  counts = collections.Counter(answer)
  order = list(dict.fromkeys(answer))
  return order, [counts[a] / len(answer) for a in order]


class VqaSource:
  """The official VQA files (module docstring)."""

  def __init__(self, path, image_root: str = "", vg_root: str = ""):
    self.kind, self._entries = F.IMAGE, _Entries(path)
    self.image_root, self.vg_root = image_root, vg_root

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, i: int) -> dict:
    obj, rid, _ = self._entries.get(i)
    if "question_id" in obj:
      rid = str(obj["question_id"])
    question, image = _text(obj, "question", rid), _text(obj, "image", rid)
    dataset = obj.get("dataset")
    root = {"vg": self.vg_root, "gqa": ""}.get(dataset, self.image_root)
    try:
      answers, weights = answer_weights(obj.get("answer"), dataset)
    except ValueError as e:
      raise F.SkipRecord("bad_field_type", rid, "answer", str(e)) from None
    raw = obj.get("answer")
    return {
      "kind": F.IMAGE,
      "id": rid,
      "image_id": image,
      "image": _read(os.path.join(root, image) if root else image, rid, "image"),
      "captions": [question],
      "answers": answers,
      "answer_weights": weights,
      "question_id": obj.get("question_id", rid),
      "annotator_answers": list(raw) if isinstance(raw, list) else ([raw] if raw else []),
    }


def nlvr2_label(value, rid: str) -> int:
  """1 for "True" / True, 0 for "False" / False (the official labels)."""
  if value in ("True", True):
    return 1
  if value in ("False", False):
    return 0
  raise F.SkipRecord("bad_field_type", rid, "label", f"unsupported label {value!r}")


class Nlvr2Source:
  """The official NLVR2 files (module docstring)."""

  def __init__(self, path, image_root: str = ""):
    self.kind, self._entries, self.image_root = F.IMAGE, _Entries(path), image_root

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, i: int) -> dict:
    obj, rid, _ = self._entries.get(i)
    images = obj.get("images")
    if (
      not isinstance(images, list)
      or len(images) != 2
      or not all(isinstance(p, str) for p in images)
    ):
      raise F.SkipRecord("bad_field_type", rid, "images", "need [left path, right path]")
    paths = [os.path.join(self.image_root, p) if self.image_root else p for p in images]
    return {
      "kind": F.IMAGE,
      "id": rid,
      "image_id": images[0],
      "image": _read(paths[0], rid, "images[0]"),
      "pair_image": _read(paths[1], rid, "images[1]"),
      "captions": [_text(obj, "sentence", rid)],
      "label": nlvr2_label(obj.get("label"), rid),
    }


def frames_file(video_id: str, naming: str) -> str:
  """The frames file name of a video: MSRVTT-QA `video<N>` -> `video_<N>.json`, MSVD-QA
  `<id>` -> `<id>.json`."""
  if naming == "msrvtt":
    if not video_id.startswith("video") or not video_id[5:].isdigit():
      raise ValueError(f"MSRVTT video id {video_id!r} is not video<N>")
    return f"video_{int(video_id[5:])}.json"
  if naming == "msvd":
    return f"{video_id}.json"
  raise ValueError(f"frames naming {naming!r}: expected 'msrvtt' or 'msvd'")


class VideoQaSource:
  """The official MSRVTT-QA / MSVD-QA files (module docstring)."""

  def __init__(self, path, ans2label: str, frames_root: str, naming: str = "msrvtt"):
    if naming not in ("msrvtt", "msvd"):
      raise ValueError(f"video_qa source: naming {naming!r}, expected 'msrvtt' or 'msvd'")
    self.kind, self._entries = F.VIDEO, _Entries(path, lines=True)
    self.frames_root, self.naming = frames_root, naming
    with open(ans2label, encoding="utf-8") as f:
      self.ans2label = {str(k): int(v) for k, v in json.load(f).items()}

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, i: int) -> dict:
    obj, rid, _ = self._entries.get(i)
    video_id, answer = _text(obj, "video_id", rid), _text(obj, "answer", rid)
    try:
      name = frames_file(video_id, self.naming)
    except ValueError as e:
      raise F.SkipRecord("bad_field_type", rid, "video_id", str(e)) from None
    path = os.path.join(self.frames_root, name)
    try:
      frames = [base64.b64decode(x, validate=True) for x in json.loads(_read(path, rid, "frames"))]
    except (ValueError, TypeError, binascii.Error) as e:
      raise F.SkipRecord("corrupt_image", rid, "frames", f"{path}: {e}") from None
    return {
      "kind": F.VIDEO,
      "id": rid,
      "image_id": video_id,
      "clips": [frames],
      "captions": [_text(obj, "question", rid)],
      "answer": answer,
      "label": self.ans2label.get(answer, F.IGNORE_LABEL),
    }
