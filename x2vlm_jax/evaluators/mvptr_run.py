"""The MVPTR evaluators of a run (`evaluators.run.evaluate` hands an MVPTR model here): each
configured split read from its Oscar-layout spec with the run's example lengths and tokenizer
(`EvalConfig.mvptr_inputs`), unmasked (`mvptr_stream.heldout_arrays`), then the metric functions
of `mvptr_retrieval.py`.

  mvptr_retrieval   eval/mvptr_retrieval[/<split>]/{txt_r1, ..., r_mean} (ITM re-ranked),
                    .../<split>_uni/... the VSC ranking alone, chance_r1, num_images, num_texts
  mvptr_grounding   eval/mvptr_grounding[/<split>]/acc over the grounded phrases of a
                    layout (`mvptr_grounding_file.grounding_targets`), chance_acc, num_phrases
  mvptr_vqa         eval/mvptr_vqa[/<split>]/score, best_constant (`mvptr_qa.py`; task specs)
  mvptr_ve          eval/mvptr_ve[/<split>]/acc, majority_acc

Evaluation sets are small (held-out splits); every process builds the same arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from x2vlm_jax import tasks_mvptr as TM
from x2vlm_jax.evaluators import mvptr_qa
from x2vlm_jax.evaluators import mvptr_retrieval as MR
from x2vlm_jax.evaluators.settings import (
  EvalConfig,
  MvptrGroundingSettings,
  MvptrRetrievalSettings,
  prefix,
)

ENTRY_KEYS = ("type", "spec", "data_dir", "index_cache_dir")


def _source(entry: dict, tokenizer: str, where: str):
  from data_pipelines.mvptr_oscar import OscarSource  # pylint: disable=g-import-not-at-top

  unknown = sorted(set(entry) - set(ENTRY_KEYS))
  if entry.get("type") != "oscar" or unknown or not entry.get("spec"):
    raise ValueError(
      f"{where}: an MVPTR split entry is {{'type': 'oscar', 'spec': path[, 'data_dir', "
      f"'index_cache_dir']}}, got {entry}"
    )
  return OscarSource(
    entry["spec"],
    tokenizer=tokenizer or None,
    index_cache_dir=entry.get("index_cache_dir") or None,
    data_dir=entry.get("data_dir") or None,
  )


def _split_rows(evaluator, split, entries, inputs, say, targets: int = 0):
  """Stacked unmasked rows of a split's sources (+ grounding targets [N, targets] if > 0)."""
  field = f"eval.{evaluator}.data" + (f".{split}" if split else "")
  from data_pipelines import mvptr_grounding_file, mvptr_stream  # pylint: disable=g-import-not-at-top

  if inputs is None:
    raise ValueError(f"{field}: MVPTR evaluation needs EvalConfig.mvptr_inputs (an MVPTR run)")
  example, tokenizer = inputs
  parts, goals = [], []
  for i, entry in enumerate(entries):
    src = _source(dict(entry), tokenizer, f"{field}[{i}]")
    rows, skips = mvptr_stream.heldout_arrays(src, example)
    if skips:
      say(f"{field}[{i}]: skipped {skips}")
    parts.append(rows)
    if targets:
      goals.append(mvptr_grounding_file.grounding_targets(src, targets)[rows["index"]])
  rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return rows, (np.concatenate(goals) if targets else None)


def _retrieval(model, sec: MvptrRetrievalSettings, cfg: EvalConfig, say) -> dict[str, float]:
  metrics = {}
  for split, entries in sec.data:
    t0, name = time.time(), prefix("mvptr_retrieval", split)
    rows, _ = _split_rows("mvptr_retrieval", split, entries, cfg.mvptr_inputs, say)
    images, texts, txt2img = MR.retrieval_inputs(rows)
    if sec.max_images and images["regions"].shape[0] > sec.max_images:
      keep = txt2img < sec.max_images  # the first images in order of appearance
      images = {k: v[: sec.max_images] for k, v in images.items()}
      texts, txt2img = {k: v[keep] for k, v in texts.items()}, txt2img[keep]
    out = MR.evaluate_mvptr_retrieval(
      model, images, texts, txt2img, k_c=sec.k_c, k_i=sec.k_i, block=cfg.batch_size, prefix=name
    )
    n_img = images["regions"].shape[0]
    out |= {
      f"{name}/num_images": float(n_img),
      f"{name}/num_texts": float(len(txt2img)),
      f"{name}/chance_r1": 100.0 / n_img,  # text -> image R@1 of a random ranker
      f"{name}/seconds": time.time() - t0,
    }
    metrics.update(out)
  return metrics


def grounding_chance(data, inclusive: bool) -> float:
  """Expected accuracy (percent) of a uniformly random choice among each row's real regions:
  the mean fraction of real regions whose IoU with the ground truth passes the threshold."""
  iou = np.asarray(TM.region_iou(data["region_boxes"], data["gt_box"]))
  real = np.asarray(data["region_mask"]) > 0
  right = (iou >= 0.5) if inclusive else (iou > 0.5)
  return 100.0 * float(np.mean(np.sum(right & real, axis=1) / np.sum(real, axis=1)))


def _grounding(model, sec: MvptrGroundingSettings, cfg: EvalConfig, say) -> dict[str, float]:
  from data_pipelines import mvptr_finetune_examples as FE  # pylint: disable=g-import-not-at-top

  metrics = {}
  for split, entries in sec.data:
    t0, name = time.time(), prefix("mvptr_grounding", split)
    example = cfg.mvptr_inputs[0] if cfg.mvptr_inputs else None
    width = example.max_phrases if example is not None else 0
    rows, targets = _split_rows("mvptr_grounding", split, entries, cfg.mvptr_inputs, say, width)
    data = FE.grounding_rows(rows, targets)
    if sec.max_phrases:
      data = {k: v[: sec.max_phrases] for k, v in data.items()}
    out = MR.evaluate_mvptr_grounding(
      model, data, variant=sec.variant, block=cfg.batch_size, prefix=name
    )
    out |= {
      f"{name}/num_phrases": float(data["gt_box"].shape[0]),
      f"{name}/chance_acc": grounding_chance(data, inclusive=sec.variant == "code"),
      f"{name}/seconds": time.time() - t0,
    }
    metrics.update(out)
  return metrics


def evaluate(
  model, eval_cfg: EvalConfig, say: Callable[[str], None], result_dir: str | None = None
) -> dict[str, float]:
  """The configured MVPTR evaluators on `model` (an MVPTR); other evaluators are an error.
  `result_dir`: where the VQA result files go unless the settings name one."""
  other = [n for n in eval_cfg.names if not n.startswith("mvptr_")]
  if other:
    raise ValueError(f"eval.evaluators {other} evaluate X²-VLM models; this run trains MVPTR")
  metrics: dict[str, float] = {}
  if eval_cfg.mvptr_retrieval is not None:
    metrics.update(_retrieval(model, eval_cfg.mvptr_retrieval, eval_cfg, say))
  if eval_cfg.mvptr_grounding is not None:
    metrics.update(_grounding(model, eval_cfg.mvptr_grounding, eval_cfg, say))
  for task in ("mvptr_vqa", "mvptr_ve"):
    if getattr(eval_cfg, task) is not None:
      sec = getattr(eval_cfg, task)
      metrics.update(mvptr_qa.evaluate(model, task, sec, eval_cfg, say, result_dir))
  return metrics
