"""Evaluation sets of VQA, NLVR2 and video QA, built from the task sources' records
(`data_pipelines/task_sources.py`) with the official test transforms: bicubic resize to R x R,
evaluation frame sampling for videos, questions cleaned by `pre_question` with the official
test limit of 50 words (NLVR2 sentences by `pre_caption`), then the fixed-length tokens.
Bad records are counted per skip reason, as in `eval_data.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines import features as F
from data_pipelines import image_ops, video_ops
from data_pipelines.checks import decode_image
from data_pipelines.task_examples import answer_layout, pre_question
from data_pipelines.text_ops import Tokenizer, pre_caption
from x2vlm_jax.evaluators.eval_data import _records

TEST_QUESTION_WORDS = 50  # the official test-time question limit


@dataclasses.dataclass
class VqaSet:
  """Questions with their images and (when the file has them) the annotators' answers.

  pixels [Ni, R, R, 3] distinct images; image_index [Nq]; ids / mask [Nq, L] questions;
  question_ids [Nq]; answers: the annotators' answers per question ([] without them)."""

  pixels: np.ndarray
  image_index: np.ndarray
  ids: np.ndarray
  mask: np.ndarray
  question_ids: list
  answers: list[list[str]]
  skips: dict[str, int]


@dataclasses.dataclass
class ClassifySet:
  """NLVR2 pairs (pixels and pair_pixels [N, R, R, 3]) or video questions (pixels = frames
  [N, F, R, R, 3], pair_pixels None) with texts ids / mask [N, L] and labels [N]."""

  pixels: np.ndarray
  pair_pixels: np.ndarray | None
  ids: np.ndarray
  mask: np.ndarray
  labels: np.ndarray
  skips: dict[str, int]


def _question(raw, tokenizer: Tokenizer, rid: str, clean=None):
  if clean is None:
    text = pre_question(raw, TEST_QUESTION_WORDS, rid, "question")
  else:
    text = clean(raw, tokenizer.max_tokens, rid, "sentence")
  return tokenizer(text, rid, "question")


def _image(data, rid: str, field: str, res: int) -> np.ndarray:
  return image_ops.eval_transform(decode_image(data, rid, field), res)


def vqa_set(sources: Sequence[Any], tokenizer: Tokenizer, res: int, max_questions: int = 0):
  """Every question of the VQA records, their images decoded once each (grouped by bytes)."""
  skips: collections.Counter = collections.Counter()
  by_hash: dict[str, int] = {}
  pixels, index, ids, mask, qids, answers = [], [], [], [], [], []
  for rec in _records(sources, skips):
    if max_questions and len(qids) >= max_questions:
      break
    rid = str(rec.get("id", "?"))
    try:
      tok = _question(rec["captions"][0], tokenizer, rid)
      digest = hashlib.sha1(bytes(rec["image"])).hexdigest()
      if digest not in by_hash:
        pixels.append(_image(rec["image"], rid, "image", res))
        by_hash[digest] = len(pixels) - 1
    except F.SkipRecord as e:
      skips[e.reason] += 1
      continue
    index.append(by_hash[digest])
    ids.append(tok.ids)
    mask.append(tok.mask)
    qids.append(rec.get("question_id", rid))
    answers.append(list(rec.get("annotator_answers") or []))
  if not qids:
    raise ValueError(f"VQA evaluation set is empty (skipped: {dict(skips)})")
  return VqaSet(
    np.stack(pixels),
    np.asarray(index, np.int32),
    np.stack(ids).astype(np.int32),
    np.stack(mask).astype(np.int32),
    qids,
    answers,
    dict(skips),
  )


def answer_list(path: str, tokenizer: Tokenizer) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(answers, ids, mask [Na, La]) of an `answer_list.json`, `[CLS] a [SEP]` padded to the
  longest (the official tokenizer call with padding='longest')."""
  with open(path, encoding="utf-8") as f:
    answers = json.load(f)
  if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
    raise ValueError(f"{path}: need a non-empty JSON list of answer strings")
  length = max(len(tokenizer.pieces(a)[0]) if a else 0 for a in answers) + 2
  rows = [answer_layout(tokenizer, a, length) for a in answers]
  return answers, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def classify_set(
  task: str,
  sources: Sequence[Any],
  tokenizer: Tokenizer,
  res: int,
  frame_len: int = 0,
  max_examples: int = 0,
) -> ClassifySet:
  """NLVR2 (task 'nlvr2') or video-QA ('video_qa', `frame_len` frames) evaluation examples."""
  skips: collections.Counter = collections.Counter()
  pixels, pair, ids, mask, labels = [], [], [], [], []
  for rec in _records(sources, skips):
    if max_examples and len(labels) >= max_examples:
      break
    rid = str(rec.get("id", "?"))
    try:
      if task == F.NLVR2:
        tok = _question(rec["captions"][0], tokenizer, rid, clean=pre_caption)
        vision = _image(rec["image"], rid, "images[0]", res)
        pair.append(_image(rec["pair_image"], rid, "images[1]", res))
      else:
        tok = _question(rec["captions"][0], tokenizer, rid)
        frames = rec["clips"][0]
        if not frames:
          raise F.SkipRecord("empty_video", rid, "frames", "0 frames")
        pick = video_ops.sample_frame_ids(len(frames), frame_len, False, np.random.default_rng(0))
        vision = np.stack([_image(frames[i], rid, f"frames[{i}]", res) for i in pick])
    except F.SkipRecord as e:
      skips[e.reason] += 1
      pair = pair[: len(labels)]
      continue
    pixels.append(vision)
    ids.append(tok.ids)
    mask.append(tok.mask)
    labels.append(int(rec["label"]))
  if not labels:
    raise ValueError(f"{task} evaluation set is empty (skipped: {dict(skips)})")
  return ClassifySet(
    np.stack(pixels),
    np.stack(pair) if pair else None,
    np.stack(ids).astype(np.int32),
    np.stack(mask).astype(np.int32),
    np.asarray(labels, np.int32),
    dict(skips),
  )
