"""MVPTR VQA and SNLI-VE fine-tuning data in the files the official `run_vqa.py` / `run_ve.py`
read (MVPTR_REFERENCE.md section 5; docs/mvptr.md#vqa-and-snli-ve-data), as grain random-access
sources of fine-tuning records.

A task spec (a JSON file; relative paths under its directory) names the files the official
command line points at:

  {"task": "vqa", "questions": "train2014_qla_mrcnn.json", "sg_file": "train_sg_tuples.json",
   "label_file": "trainval_ans2label.pkl", "img_feat_dir": "features", "use_b_text": true}
  {"task": "ve", "pairs": "snli_ve_train.jsonl", "sg_file": "train_sgs.json",
   "id2phrase_file": "id2phrase_new.json", "img_feat_dir": "features", "use_b_text": false}

  questions     JSON list of {"q": question, "an": [answer labels], "s": [soft scores],
                "img_id": image id, "q_id", "o": tags (unused: tags come from predictions.tsv)};
                entries with an empty "an" are left out, as the official `_create_examples`
  label_file    `ans2label` {answer string: label} as a pickle (official) or JSON; answer index
                i = the i-th label of its values (official `label_map`)
  pairs         SNLI-VE JSON lines {"Flickr30K_ID", "sentence2" (the hypothesis), "gold_label",
                "pairID"}
  sg_file       aligned with the questions / pairs: VQA [phrase ids, info]; VE [[words of a
                tuple], ...], pairID] mapped through `id2phrase_file` (tuples outside dropped)
  img_feat_dir  features.tsv (image id, num_boxes, base64 float32 [num_boxes x 2054]) +
                imageid2idx.json (keys' last "_" part = the image id, as official) +
                predictions.tsv (image id, JSON {"objects": [{"class"}]}): the tags
  use_b_text    the official `--use_b_text`: tags also appended to the text (segment 1)
  test          (VQA) a split without answers (test-dev / test-std): every question is kept,
                "an" / "s" may be missing (zero target), "q_id" is required (the result
                file's question_id)

A record is {words, phrases, tags, text_tags (tags again with use_b_text, else empty) int32,
regions float32 [n, 2054], image_id int64, id "<file>:<index>", answer_scores [A] float32 (VQA)
| ve_label int32 (VE)}; `mvptr_finetune_examples.task_row` turns it into a fine-tuning row. A bad
record raises `features.SkipRecord` naming the record and the field (the stream skips and
counts it).
"""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np

from data_pipelines import features as F
from data_pipelines import mvptr_regions
from data_pipelines.mvptr_finetune_examples import VE_LABELS, vqa_scores
from data_pipelines.mvptr_oscar import TsvRows, image_key_id, load_tokenizer
from data_pipelines.mvptr_phrases import PhraseTable, as_tuple

TASKS = ("vqa", "ve")
FILES = {"vqa": ("questions", "sg_file", "label_file"), "ve": ("pairs", "sg_file")}
OPTIONAL = ("id2phrase_file", "img_feature_dim", "use_b_text", "img_feat_dir", "task", "test")
FEATURES, INDEX, TAGS = "features.tsv", "imageid2idx.json", "predictions.tsv"


def read_task_spec(path: str) -> dict:
  """The task spec with its paths resolved (errors name the key)."""
  with open(path) as f:
    spec = json.load(f)
  if not isinstance(spec, dict) or spec.get("task") not in TASKS:
    raise ValueError(f"{path}: a task spec is a JSON object with 'task' one of {TASKS}")
  task = spec["task"]
  need = FILES[task] + ("img_feat_dir",) + (("id2phrase_file",) if task == "ve" else ())
  missing = [k for k in need if not spec.get(k)]
  unknown = sorted(set(spec) - set(FILES[task]) - set(OPTIONAL))
  if missing or unknown:
    raise ValueError(f"{path}: task spec of {task!r} lacks {missing} / has unknown {unknown}")
  root = os.path.dirname(os.path.abspath(path))
  out = dict(spec)
  for k in (*FILES[task], "img_feat_dir", "id2phrase_file"):
    if out.get(k) and not os.path.isabs(out[k]):
      out[k] = os.path.join(root, out[k])
  out.setdefault("use_b_text", task == "vqa")  # the official VQA command passes it
  out["test"] = bool(out.get("test", False))
  if out["test"] and task != "vqa":
    raise ValueError(f"{path}: 'test' (a split without answers) is for 'vqa' task specs")
  out.setdefault("img_feature_dim", 2054)
  return out


class _Plain(pickle.Unpickler):
  """Unpickles plain data only (dicts, lists, strings, numbers): never runs code."""

  def find_class(self, module, name):
    raise ValueError(f"label file holds a {module}.{name} object, not a plain answer dict")


def read_answers(path: str) -> list[str]:
  """The answer vocabulary of an `ans2label` file: answer i = the key whose label is the i-th
  value (official `get_labels` + `label_map`); pickle or JSON."""
  with open(path, "rb") as f:
    raw = f.read()
  ans2label = json.loads(raw) if path.endswith(".json") else _Plain(io.BytesIO(raw)).load()
  if not isinstance(ans2label, dict) or not all(isinstance(k, str) for k in ans2label):
    raise ValueError(f"{path}: expected a dict answer -> label")
  labels = list(ans2label.values())
  if sorted(labels) != list(range(len(labels))):
    raise ValueError(f"{path}: labels must be 0..{len(labels) - 1}, each once")
  answers = [""] * len(labels)
  for a, label in ans2label.items():
    answers[label] = a
  return answers


def _norm_id(key) -> str:
  """Official key normalisation: the last "_" part as an integer string ('COCO_x_0042' ->
  '42'); a key that is not a number stays as it is."""
  last = str(key).split("_")[-1]
  return str(int(last)) if last.isdigit() else last


class ImageStore:
  """features.tsv + imageid2idx.json + predictions.tsv of one `img_feat_dir`."""

  def __init__(self, directory: str, dim: int, cache_dir: str | None = None):
    for name in (FEATURES, INDEX, TAGS):
      if not os.path.isfile(os.path.join(directory, name)):
        raise FileNotFoundError(f"{os.path.join(directory, name)} does not exist")
    with open(os.path.join(directory, INDEX)) as f:
      self.index = {_norm_id(k): int(v) for k, v in json.load(f).items()}
    self.rows, self.dim = TsvRows(os.path.join(directory, FEATURES), cache_dir), int(dim)
    self.tags: dict[str, list[str] | None] = {}
    with open(os.path.join(directory, TAGS)) as f:  # read whole, as the official loader
      for line in f:
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) >= 2:
          self.tags[_norm_id(cols[0])] = _classes(cols[1])

  def regions(self, image_id: str, rid: str) -> np.ndarray:
    r = self.index.get(image_id)
    line = None if r is None else self.rows.row(r)
    if line is None:
      raise F.SkipRecord("missing_image", rid, "image_feature", f"image {image_id}")
    got, vectors = mvptr_regions.decode_feature_row(line, self.dim, rid)
    if _norm_id(got) != image_id:
      raise F.SkipRecord("bad_field_type", rid, "image_feature", f"row of {got!r}")
    return vectors

  def classes(self, image_id: str, rid: str) -> list[str]:
    if image_id not in self.tags:
      raise F.SkipRecord("missing_image", rid, "predictions", f"no tags of image {image_id}")
    if self.tags[image_id] is None:
      raise F.SkipRecord("bad_json", rid, "predictions", f"tag row of image {image_id}")
    return self.tags[image_id]


def _classes(text: str) -> list[str] | None:
  """De-duplicated detector classes of a predictions.tsv JSON cell (first-seen order; the
  official takes a set, whose order is arbitrary); None when malformed."""
  try:
    info = json.loads(text)
  except ValueError:
    return None
  objects = info.get("objects") if isinstance(info, dict) else info
  if not isinstance(objects, list) or not all(
    isinstance(o, dict) and isinstance(o.get("class"), str) for o in objects
  ):
    return None
  return list(dict.fromkeys(o["class"] for o in objects))


def _load_json(path: str):
  with open(path) as f:
    return json.load(f)


class TaskSource:
  """grain `RandomAccessDataSource` of VQA or SNLI-VE records (module docstring).

  Args: spec path; tokenizer (a `text_ops.Tokenizer`, a directory, None = MiniLM's vocabulary);
  vocab_size: the model's table size (phrase ids outside are a bad record), None = unchecked.
  Attributes: task, answers (VQA), excluded {reason: entries not indexed}.
  """

  def __init__(self, spec: str, tokenizer=None, vocab_size=None, index_cache_dir=None):
    self.path, self.spec = spec, read_task_spec(spec)
    s = self.spec
    self.task, self.use_b_text, self.test = s["task"], bool(s["use_b_text"]), s["test"]
    self.tokenizer, self.vocab_size = load_tokenizer(tokenizer), vocab_size
    self.images = ImageStore(s["img_feat_dir"], int(s["img_feature_dim"]), index_cache_dir)
    self.sg = _load_json(s["sg_file"])
    if self.task == "vqa":
      self.answers = read_answers(s["label_file"])
      self.entries = _load_json(s["questions"])
      self.file = os.path.basename(s["questions"])
    else:
      self.vocab = PhraseTable.load(s["id2phrase_file"])
      with open(s["pairs"]) as f:
        self.entries = [line for line in f]  # parsed per record: a bad line is one bad record
      self.file = os.path.basename(s["pairs"])
    if not isinstance(self.entries, list) or len(self.sg) != len(self.entries):
      raise ValueError(f"{s['sg_file']}: {len(self.sg)} entries for {len(self.entries)} records")
    keep, self.excluded = [], {}
    for i, e in enumerate(self.entries):
      if self.task == "vqa" and not self.test and isinstance(e, dict) and e.get("an") == []:
        self.excluded["no_answer"] = self.excluded.get("no_answer", 0) + 1  # official: dropped
      elif self.task == "ve" and not e.strip():
        self.excluded["blank_line"] = self.excluded.get("blank_line", 0) + 1
      else:
        keep.append(i)
    self.rows = np.asarray(keep, np.int64)

  def __len__(self) -> int:
    return len(self.rows)

  def __repr__(self) -> str:
    return f"TaskSource({self.path!r}, task={self.task}, records={len(self)})"

  def location(self, i: int) -> tuple[str, int]:
    """(questions / pairs file, 1-based entry or line number) of record i (the validator's)."""
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    return self.spec["questions" if self.task == "vqa" else "pairs"], int(self.rows[i]) + 1

  def question_id(self, i: int) -> int:
    """The "q_id" of VQA record i (-1 where the entry has none; a test split requires it)."""
    e = self.entries[int(self.rows[i])]
    q = e.get("q_id", -1) if isinstance(e, dict) else -1
    return int(q) if isinstance(q, int) else -1

  def __getitem__(self, i: int) -> dict:
    """Record i; raises `SkipRecord` for a bad entry (never anything else)."""
    k = int(self.rows[i])
    rid = f"{self.file}:{k + 1}"
    if self.task == "vqa":
      text, image, target, phrases = self._vqa(self.entries[k], self.sg[k], rid)
    else:
      text, image, target, phrases = self._ve(self.entries[k], self.sg[k], rid)
    words = self.tokenizer.pieces(text)[0]
    if not words:
      raise F.SkipRecord("caption_no_tokens", rid, "text", f"{text[:60]!r}")
    classes = self.images.classes(image, rid)
    tags = np.asarray(self.tokenizer.pieces(" ".join(classes))[0] if classes else [], np.int32)
    return dict(
      words=np.asarray(words, np.int32),
      phrases=np.asarray(phrases, np.int32),
      tags=tags,
      text_tags=tags if self.use_b_text else np.zeros(0, np.int32),
      regions=self.images.regions(image, rid),
      image_id=np.int64(image_key_id(self.task, image)),
      id=rid,
      **target,
    )

  def __getitems__(self, indices) -> list[dict]:
    return [self[i] for i in indices]

  def _ids(self, ids, rid: str) -> list[int]:
    ok = isinstance(ids, list) and all(isinstance(p, int) and p >= 0 for p in ids)
    if not ok or (self.vocab_size and ids and max(ids) >= self.vocab_size):
      raise F.SkipRecord("bad_field_type", rid, "sg_file", f"phrase ids {str(ids)[:60]}")
    return ids

  def _vqa(self, e, sg, rid: str):
    if not isinstance(e, dict):
      raise F.SkipRecord("bad_json", rid, "questions", "entry is not an object")
    q, an, s = e.get("q"), e.get("an"), e.get("s")
    if not isinstance(q, str) or not q.strip():
      raise F.SkipRecord("empty_caption", rid, "q", repr(q)[:60])
    if self.test:
      if not isinstance(e.get("q_id"), int):
        raise F.SkipRecord("bad_field_type", rid, "q_id", "a test question needs an integer id")
      an, s = (an, s) if an else ([], [])
    if not isinstance(an, list) or not isinstance(s, list) or len(an) != len(s):
      raise F.SkipRecord("bad_field_type", rid, "an/s", "need answer labels and scores alike")
    if "img_id" not in e:
      raise F.SkipRecord("bad_field_type", rid, "img_id", "missing")
    try:
      scores = vqa_scores(an, s, len(self.answers), rid)
    except (TypeError, ValueError) as err:
      raise F.SkipRecord("bad_field_type", rid, "an", str(err)) from None
    if not isinstance(sg, list) or len(sg) < 1:
      raise F.SkipRecord("bad_field_type", rid, "sg_file", "need [phrase ids, info]")
    return q, _norm_id(e["img_id"]), {"answer_scores": scores}, self._ids(sg[0], rid)

  def _ve(self, line: str, sg, rid: str):
    try:
      e = json.loads(line)
    except ValueError:
      raise F.SkipRecord("bad_json", rid, "pairs", "line is not JSON") from None
    if not isinstance(e, dict):
      raise F.SkipRecord("bad_json", rid, "pairs", "line is not an object")
    text, label = e.get("sentence2"), e.get("gold_label")
    if not isinstance(text, str) or not text.strip():
      raise F.SkipRecord("empty_caption", rid, "sentence2", repr(text)[:60])
    if label not in VE_LABELS:
      raise F.SkipRecord("bad_field_type", rid, "gold_label", repr(label)[:40])
    if "Flickr30K_ID" not in e:
      raise F.SkipRecord("bad_field_type", rid, "Flickr30K_ID", "missing")
    if not isinstance(sg, list) or len(sg) < 2 or sg[1] != e.get("pairID"):
      raise F.SkipRecord("bad_field_type", rid, "sg_file", "entry's pairID differs")
    tuples = [as_tuple(p) for p in sg[0]] if isinstance(sg[0], list) else [None]
    if any(t is None for t in tuples):
      raise F.SkipRecord("bad_field_type", rid, "sg_file", "phrases must be lists of words")
    ids = [self.vocab.tuple_to_id[t] for t in tuples if t in self.vocab.tuple_to_id]
    target = {"ve_label": np.int32(VE_LABELS[label])}
    return text, _norm_id(e["Flickr30K_ID"]), target, self._ids(ids, rid)


def answer_pieces(spec: str, tokenizer=None) -> list[list[int]]:
  """The word pieces of every answer of a VQA task spec's label file, in answer order (what
  `init_qa_head_from_mlm` averages the MLM rows over)."""
  s = read_task_spec(spec)
  if s["task"] != "vqa":
    raise ValueError(f"{spec}: answer pieces need a 'vqa' task spec, not {s['task']!r}")
  tok = load_tokenizer(tokenizer)
  return [list(tok.pieces(a)[0]) for a in read_answers(s["label_file"])]
