"""MVPTR VQA and SNLI-VE evaluation (docs/mvptr.md#fine-tuning), as the official `run_vqa.py`
`evaluate` (`compute_score_with_logits`: the soft VQA score of the argmax answer, averaged over
the questions) and `run_ve.py` (accuracy of the argmax class):

  eval/mvptr_vqa[/<split>]/score          100 x mean soft score of the argmax answer
                           /best_constant the same of the best single answer for every question
                                          (what a model ignoring its inputs can reach)
                           /num_questions
                                          + the official result file mvptr_vqa_result[_<split>].json
                                          ([{question_id, answer}]) in the result directory; a
                                          test split (no answers) gives only that file and the count
  eval/mvptr_ve[/<split>]/acc             100 x accuracy
                          /majority_acc   the most frequent class's share
                          /num_pairs

Each split's rows come from its task spec (`data_pipelines/mvptr_task_sources.py`) through the
training rows' builder (`mvptr_finetune_examples.task_row`), read with the run's example lengths
and tokenizer; the logits in jitted fixed-size blocks (the last one padded by repeating its last
row, so each function compiles once). Evaluation sets are held-out splits; every process builds
the same arrays.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from x2vlm_jax import paths
from x2vlm_jax import tasks_mvptr as TM
from x2vlm_jax.evaluators.settings import EvalConfig, MvptrTaskSettings, prefix

INPUTS = ("text_ids", "text_mask", "text_type_ids", "tag_ids", "tag_mask", "regions")
INPUTS += ("region_mask",)
TARGET = {"mvptr_vqa": "answer_scores", "mvptr_ve": "ve_label"}


def logits(model, data: Mapping, task: str, block: int) -> np.ndarray:
  """[N, answers] (vqa) or [N, 3] (ve) float32 logits of every row, deterministic forward."""
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  graphdef, state = nnx.split(model)

  def fn(state, b):
    m = nnx.merge(graphdef, state)
    out = TM.joint(m, b)
    return (
      m.vqa_logits(out.sequence[:, 0]) if task == "mvptr_vqa" else m.classifier_logits(out.pooled)
    )

  run = jax.jit(fn)
  arrays = {k: np.asarray(data[k]) for k in INPUTS}
  n = arrays["text_ids"].shape[0]
  outs = []
  for start in range(0, n, block):
    stop = min(start + block, n)
    take = np.minimum(np.arange(start, start + block), stop - 1)
    out = run(state, {k: a[take] for k, a in arrays.items()})
    outs.append(np.asarray(jax.device_get(out))[: stop - start])
  return np.concatenate(outs)


def vqa_score(logits_, scores) -> float:
  """100 x mean soft score of the argmax answer (official `compute_score_with_logits`)."""
  best = np.argmax(np.asarray(logits_), axis=1)
  return 100.0 * float(np.mean(np.asarray(scores)[np.arange(len(best)), best]))


def _metrics(task: str, name: str, out: np.ndarray, target: np.ndarray) -> dict[str, float]:
  if task == "mvptr_vqa":
    return {
      f"{name}/score": vqa_score(out, target),
      f"{name}/best_constant": 100.0 * float(np.max(np.mean(target, axis=0))),
      f"{name}/num_questions": float(len(target)),
    }
  counts = np.bincount(target.astype(np.int64), minlength=3)
  return {
    f"{name}/acc": 100.0 * float(np.mean(np.argmax(out, axis=1) == target)),
    f"{name}/majority_acc": 100.0 * float(counts.max() / counts.sum()),
    f"{name}/num_pairs": float(len(target)),
  }


def split_rows(task: str, split: str, entries, inputs, say) -> dict[str, np.ndarray]:
  """Stacked rows of a split's task specs (errors name `eval.<task>.data.<split>[i]`); VQA rows
  also carry `question_id` int64 and the split's `answers` (one label file for the split)."""
  from data_pipelines import mvptr_finetune_examples as FE  # pylint: disable=g-import-not-at-top
  from data_pipelines import mvptr_stream  # pylint: disable=g-import-not-at-top
  from data_pipelines.mvptr_task_sources import TaskSource  # pylint: disable=g-import-not-at-top

  field = f"eval.{task}.data" + (f".{split}" if split else "")
  if inputs is None:
    raise ValueError(f"{field}: MVPTR evaluation needs EvalConfig.mvptr_inputs (an MVPTR run)")
  example, tokenizer = inputs
  parts, answers = [], None
  for i, entry in enumerate(entries):
    entry = dict(entry)
    if entry.get("type") != "task" or set(entry) - {"type", "spec"} or not entry.get("spec"):
      raise ValueError(f"{field}[{i}]: an entry is {{'type': 'task', 'spec': path}}, got {entry}")
    src = TaskSource(entry["spec"], tokenizer or None, example.vocab_size)
    if src.task != task.removeprefix("mvptr_"):
      raise ValueError(f"{field}[{i}]: {entry['spec']} is a {src.task!r} spec, not for {task}")
    rows, skips = mvptr_stream.heldout_arrays(src, example, build=FE.task_row)
    if skips:
      say(f"{field}[{i}]: skipped {skips}")
    if task == "mvptr_vqa":
      rows["question_id"] = np.asarray([src.question_id(int(j)) for j in rows["index"]], np.int64)
      if answers is not None and src.answers != answers:
        raise ValueError(f"{field}[{i}]: its label file differs from the split's first")
      answers = src.answers
    parts.append(rows)
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return out if answers is None else {**out, "answers": answers}


def evaluate(
  model, task: str, sec: MvptrTaskSettings, cfg: EvalConfig, say, result_dir=None
) -> dict[str, float]:
  """`task` 'mvptr_vqa' | 'mvptr_ve' on every split of `sec` (module docstring)."""
  metrics, out_dir = {}, sec.result_dir or result_dir
  for split, entries in sec.data:
    t0, name = time.time(), prefix(task, split)
    rows = split_rows(task, split, entries, cfg.mvptr_inputs, say)
    answers = rows.pop("answers", None)
    if sec.max_rows:
      rows = {k: v[: sec.max_rows] for k, v in rows.items()}
    out = logits(model, rows, task, cfg.batch_size)
    target = np.asarray(rows[TARGET[task]])
    if task == "mvptr_vqa" and out_dir and jax.process_index() == 0:
      path = write_vqa_result(out_dir, split, rows["question_id"], out, answers)
      say(f"{name}: wrote {path}")
    if task == "mvptr_vqa" and not target.any():  # a test split: no answers to score
      metrics[f"{name}/num_questions"] = float(len(target))
    else:
      metrics |= _metrics(task, name, out, target)
    metrics[f"{name}/seconds"] = time.time() - t0
  return metrics


def write_vqa_result(out_dir, split: str, question_ids, logits_, answers) -> str:
  """The official VQA result file: [{"question_id", "answer": the argmax answer}]."""
  best = np.argmax(np.asarray(logits_), axis=1)
  rows = [{"question_id": int(q), "answer": answers[int(b)]} for q, b in zip(question_ids, best)]
  path = paths.path(out_dir) / f"mvptr_vqa_result{'_' + split if split else ''}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rows))
  return str(path)
