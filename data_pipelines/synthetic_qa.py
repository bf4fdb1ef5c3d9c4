"""Synthetic VQA, NLVR2 and video-QA sets from the shapes world, written in the official file
formats (`task_sources.py` reads them; docs/data.md#synthetic-fine-tuning-tasks):

  write_vqa        images + vqa_{train,val,test}.json ({question_id, image, question, answer:
                   10 annotator answers}) + answer_list.json; questions about colours, shapes,
                   counts and positions
  write_nlvr2      images + nlvr_{train,dev,test}.json ({images: [left, right], sentence,
                   label}): statements comparing or describing the two scenes, balanced
  write_video_qa   frames/video_<N>.json (base64 PNG frames) + {train,val,test}.jsonl
                   ({video_id, question, answer}) + train_ans2label.json: questions about the
                   motion and the colour / shape of a moving shape (MSRVTT-QA naming)

Deterministic for `seed`; splits come from disjoint world seeds (`synthetic_tasks.split_seed`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from data_pipelines import synthetic as S
from data_pipelines.synthetic_tasks import _png, _scenes, _write_bytes, _write_json, split_seed

_NUMBERS = {1: "1", 2: "2", 3: "3", 4: "4"}


def scene_questions(shapes: list[S.Shape], image_size: int, rng) -> list[tuple[str, str]]:
  """(question, answer) pairs that are true of a scene: colour, shape, count, position, yes/no.
  Every (colour, shape) pair of a scene is distinct, so each question has one answer."""
  qa = [("how many shapes are there?", _NUMBERS[len(shapes)])]
  for s in shapes:
    qa.append((f"what color is the {s.shape}?", s.colour) if _unique(shapes, "shape", s) else None)
    qa.append(
      (f"what shape is the {s.colour} object?", s.shape) if _unique(shapes, "colour", s) else None
    )
    qa.append((f"where is the {s.colour} {s.shape}?", S.where(s, image_size)))
  colour = str(rng.choice(list(S.COLOURS)))
  qa.append(
    (f"is there a {colour} shape?", "yes" if any(s.colour == colour for s in shapes) else "no")
  )
  shape = str(rng.choice(S.SHAPES))
  qa.append(
    (f"is there a {shape} in the image?", "yes" if any(s.shape == shape for s in shapes) else "no")
  )
  return [x for x in qa if x is not None]


def _unique(shapes, attr, s) -> bool:
  return sum(getattr(o, attr) == getattr(s, attr) for o in shapes) == 1


@dataclasses.dataclass(frozen=True)
class VqaFiles:
  image_root: str
  train: str
  val: str
  test: str
  answer_list: str

  def source(self, split: str) -> dict:
    return {"type": "vqa", "path": getattr(self, split), "image_root": self.image_root}


def write_vqa(
  out_dir,
  n_train: int = 16,
  n_val: int = 8,
  n_test: int = 8,
  questions_per_image: int = 3,
  image_size: int = 64,
  seed: int = S.TRAIN_SEED,
  world: Mapping[str, Any] | None = None,
) -> VqaFiles:
  """images/<split>/NNNNNN.png and the official VQA files under out_dir (module docstring)."""
  out_dir = os.fspath(out_dir)
  root, seen, paths, answers = os.path.join(out_dir, "images"), set(), {}, set()
  for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
    cfg = S.WorldConfig(**{**dict(world or {}), "image_size": image_size})
    w = S.ShapesWorld(cfg, seed=split_seed(seed, split))
    entries = []
    for k, (index, data, shapes) in enumerate(_scenes(w, n, seen)):
      rel = f"{split}/{k:06d}.png"
      _write_bytes(os.path.join(root, rel), data)
      rng = np.random.default_rng([w.seed, 17, index])
      qa = scene_questions(shapes, image_size, rng)
      for j in sorted(rng.choice(len(qa), min(questions_per_image, len(qa)), replace=False)):
        q, a = qa[j]
        qid = len(entries) + {"train": 1, "val": 2, "test": 3}[split] * 10**7
        entries.append({"question_id": qid, "image": rel, "question": q, "answer": [a] * 10})
        answers.add(a)
    paths[split] = _write_json(os.path.join(out_dir, f"vqa_{split}.json"), entries)
  answer_list = _write_json(os.path.join(out_dir, "answer_list.json"), sorted(answers))
  return VqaFiles(root, paths["train"], paths["val"], paths["test"], answer_list)


def _statements(left: list[S.Shape], right: list[S.Shape], rng) -> list[tuple[str, bool]]:
  """NLVR2-style statements about a pair of scenes with their truth."""
  colour, shape = str(rng.choice(list(S.COLOURS))), str(rng.choice(S.SHAPES))
  has = lambda shapes, attr, v: any(getattr(s, attr) == v for s in shapes)
  return [
    ("the left image has more shapes than the right image", len(left) > len(right)),
    ("the right image has more shapes than the left image", len(right) > len(left)),
    (
      f"both images contain a {colour} shape",
      has(left, "colour", colour) and has(right, "colour", colour),
    ),
    (f"the left image contains a {shape}", has(left, "shape", shape)),
    (f"the right image contains a {colour} shape", has(right, "colour", colour)),
    (
      f"there is a {shape} in exactly one image",
      has(left, "shape", shape) != has(right, "shape", shape),
    ),
  ]


@dataclasses.dataclass(frozen=True)
class Nlvr2Files:
  image_root: str
  train: str
  dev: str
  test: str

  def source(self, split: str) -> dict:
    return {"type": "nlvr2", "path": getattr(self, split), "image_root": self.image_root}


def write_nlvr2(
  out_dir,
  n_train: int = 16,
  n_dev: int = 8,
  n_test: int = 8,
  image_size: int = 64,
  seed: int = S.TRAIN_SEED,
  world: Mapping[str, Any] | None = None,
) -> Nlvr2Files:
  """n pairs per split (two new scenes each) with one statement each, true and false alternating
  as far as the pair allows (module docstring)."""
  out_dir = os.fspath(out_dir)
  root, seen, paths = os.path.join(out_dir, "images"), set(), {}
  for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
    cfg = S.WorldConfig(**{**dict(world or {}), "image_size": image_size})
    w = S.ShapesWorld(cfg, seed=split_seed(seed, "val" if split == "dev" else split))
    scenes = _scenes(w, 2 * n, seen)
    entries = []
    for k in range(n):
      (i0, d0, left), (_, d1, right) = scenes[2 * k], scenes[2 * k + 1]
      rels = [f"{split}/{k:06d}-img0.png", f"{split}/{k:06d}-img1.png"]
      for rel, data in zip(rels, (d0, d1)):
        _write_bytes(os.path.join(root, rel), data)
      rng = np.random.default_rng([w.seed, 19, i0])
      options = _statements(left, right, rng)
      want = k % 2 == 0
      matching = [o for o in options if o[1] == want] or options
      sentence, label = matching[int(rng.integers(len(matching)))]
      entries.append({"images": rels, "sentence": sentence, "label": "True" if label else "False"})
    paths[split] = _write_json(os.path.join(out_dir, f"nlvr_{split}.json"), entries)
  return Nlvr2Files(root, paths["train"], paths["dev"], paths["test"])


@dataclasses.dataclass(frozen=True)
class VideoQaFiles:
  frames_root: str
  train: str
  val: str
  test: str
  ans2label: str

  def source(self, split: str) -> dict:
    return {
      "type": "video_qa",
      "path": getattr(self, split),
      "ans2label": self.ans2label,
      "frames_root": self.frames_root,
      "naming": "msrvtt",
    }


def write_video_qa(
  out_dir, n_train: int = 8, n_val: int = 4, n_test: int = 4, image_size: int = 64, seed=0
) -> VideoQaFiles:
  """One moving shape per video, three questions each (module docstring)."""
  out_dir = os.fspath(out_dir)
  frames_root, paths, vocab, vid = os.path.join(out_dir, "frames"), {}, {}, 0
  cfg = S.WorldConfig(image_size=image_size, multi_clip_prob=0.0)
  for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
    w, lines = S.ShapesWorld(cfg, seed=split_seed(seed, split)), []
    for index in range(n):
      frames, mover, dirs, _ = w.video(index)
      _write_json(
        os.path.join(frames_root, f"video_{vid}.json"),
        [base64.b64encode(_png(f)).decode("ascii") for f in frames],
      )
      for q, a in (
        ("which direction does the shape move?", dirs[0]),
        ("what color is the moving shape?", mover.colour),
        ("what shape is moving?", mover.shape),
      ):
        lines.append(json.dumps({"video_id": f"video{vid}", "question": q, "answer": a}))
        if split == "train":
          vocab.setdefault(a, len(vocab))
      vid += 1
    paths[split] = os.path.join(out_dir, f"{split}.jsonl")
    _write_bytes(paths[split], ("\n".join(lines) + "\n").encode("utf-8"))
  ans2label = _write_json(os.path.join(out_dir, "train_ans2label.json"), vocab)
  return VideoQaFiles(frames_root, paths["train"], paths["val"], paths["test"], ans2label)
