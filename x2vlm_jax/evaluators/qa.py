"""The VQA, NLVR2 and video-QA evaluators (called by `run.evaluate`).

Jitted functions (each compiled once per shape; the graphdef is static):
  rank(pixels [B, R, R, 3], ids, mask [B, L])          -> top answer indices [B, k] and their
       probabilities: question states, then the official answer ranking (`tasks_vqa`)
  nlvr2(pixels, pair_pixels [B, R, R, 3], ids, mask)  -> logits [B, 2]
  video_qa(frames [B, F, R, R, 3], ids, mask)         -> logits [B, C]
Questions are evaluated in batches of the evaluation batch size, each with its own image (an
image shared by several questions is encoded once per question).

Metrics per split (`settings.prefix`): VQA `acc` (the official VQA accuracy, `vqa_metric`) and
`acc_majority`; NLVR2 / video QA `acc` (percent; a video question whose answer is outside the
answer vocabulary is always wrong) and `acc_majority` (always the split's most frequent label).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from data_pipelines import features as F
from data_pipelines import mixture
from x2vlm_jax import paths, tasks_cls, tasks_vqa
from x2vlm_jax.evaluators import qa_data, vqa_metric
from x2vlm_jax.evaluators.settings import ClassifySettings, VqaSettings, prefix


def _rank(graphdef, state, pixels, ids, mask, answer_ids, answer_mask, k):
  m = nnx.merge(graphdef, state)
  q = tasks_vqa.question_states(m, pixels, ids, mask)
  return tasks_vqa.rank_answers(m, q, mask, answer_ids, answer_mask, k)


def _nlvr2(graphdef, state, pixels, pair, ids, mask):
  return tasks_cls.nlvr2_logits(nnx.merge(graphdef, state), pixels, pair, ids, mask)


def _video_qa(graphdef, state, frames, ids, mask):
  return tasks_cls.video_qa_logits(nnx.merge(graphdef, state), frames, None, ids, mask)


@functools.lru_cache(maxsize=8)
def _jitted(out_sharding) -> dict[str, Callable]:
  jit = functools.partial(jax.jit, static_argnums=0, out_shardings=out_sharding)
  return {
    "rank": jax.jit(_rank, static_argnums=(0, 7), out_shardings=out_sharding),
    "nlvr2": jit(_nlvr2),
    "video_qa": jit(_video_qa),
  }


def _out_sharding(fns):
  if fns.mesh is None:
    return None
  return jax.sharding.NamedSharding(fns.mesh, jax.sharding.PartitionSpec())


def _sources(kind: str, entries) -> list:
  return [mixture.build_source(kind, dict(e)) for e in entries]


def predict_answers(fns, data: qa_data.VqaSet, answer_ids, answer_mask, k: int, batch: int):
  """Index of the best answer of every question [Nq] (`fns`: `run._Fns`)."""
  rank = _jitted(_out_sharding(fns))["rank"]
  k = min(int(k), answer_ids.shape[0])

  def fn(state, px, ids, mask):  # the answer list is the same (replicated) input in every call
    return rank(fns.graphdef, state, px, ids, mask, answer_ids, answer_mask, k)

  top, _ = fns.batched(fn, batch, data.pixels[data.image_index], data.ids, data.mask)
  return top[:, 0]


def run_vqa(fns, sec: VqaSettings, tokenizer, res: int, batch: int, result_dir, say) -> dict:
  """Every split of the VQA evaluator: result JSON + accuracy where answers are known."""
  if not sec.answer_list:
    raise ValueError("eval.vqa.answer_list: the answer list JSON is required")
  answers, answer_ids, answer_mask = qa_data.answer_list(sec.answer_list, tokenizer)
  metrics, out_dir = {}, sec.result_dir or result_dir
  for split, entries in sec.data:
    t0, name = time.time(), prefix("vqa", split)
    data = qa_data.vqa_set(_sources(F.IMAGE, entries), tokenizer, res, sec.max_questions)
    if data.skips:
      say(f"{name}: skipped {data.skips}")
    best = predict_answers(fns, data, answer_ids, answer_mask, sec.k_test, batch)
    preds = [answers[int(i)] for i in best]
    if out_dir and jax.process_index() == 0:
      path = paths.path(out_dir) / f"vqa_result{'_' + split if split else ''}.json"
      path.parent.mkdir(parents=True, exist_ok=True)
      rows = [{"question_id": q, "answer": a} for q, a in zip(data.question_ids, preds)]
      path.write_text(json.dumps(rows))
      say(f"{name}: wrote {path}")
    known = [i for i, a in enumerate(data.answers) if a]
    if known:
      metrics.update(
        vqa_metric.evaluate_vqa([preds[i] for i in known], [data.answers[i] for i in known], name)
      )
    metrics[f"{name}/seconds"] = time.time() - t0
  return metrics


def run_classify(fns, task: str, sec: ClassifySettings, tokenizer, res, frame_len, batch, say):
  """Accuracy of the NLVR2 or video-QA evaluator on every split."""
  fn = _jitted(_out_sharding(fns))[task]
  metrics = {}
  kind = F.TASK_KIND[task]
  for split, entries in sec.data:
    t0, name = time.time(), prefix(task, split)
    data = qa_data.classify_set(
      task, _sources(kind, entries), tokenizer, res, frame_len, sec.max_examples
    )
    if data.skips:
      say(f"{name}: skipped {data.skips}")
    call = functools.partial(fn, fns.graphdef)
    arrays = (data.pixels,) + ((data.pair_pixels,) if task == F.NLVR2 else ())
    (logits,) = fns.batched(call, batch, *arrays, data.ids, data.mask)
    pred = np.argmax(logits, axis=-1)
    labels = data.labels
    values, counts = np.unique(labels[labels != F.IGNORE_LABEL], return_counts=True)
    majority = values[np.argmax(counts)] if len(values) else F.IGNORE_LABEL
    metrics[f"{name}/acc"] = 100.0 * float(np.mean(pred == labels))
    metrics[f"{name}/acc_majority"] = 100.0 * float(np.mean(labels == majority))
    metrics[f"{name}/num_examples"] = float(len(labels))
    metrics[f"{name}/seconds"] = time.time() - t0
  return metrics
