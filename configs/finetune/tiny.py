"""The tiny model fine-tuned on the synthetic task sets: the fine-tuning tests' config.

  get_config('task=retrieval|video_retrieval|grounding,data=DIR')

DIR holds the sets `data_pipelines/synthetic_tasks.py` writes at 64 px (DIR/<task>/...; the
layout of tests/test_finetune_tasks.py). Global batches of 8 (one row per simulated CPU device),
a handful of steps, evaluation on the held-out splits at the end.
"""

import ml_collections as mlc

from configs import common
from configs.finetune import demo


def sources(data_dir: str, task: str) -> dict[str, dict]:
  if task != "video_retrieval":
    return demo.sources(data_dir, task)
  d = f"{data_dir}/video_retrieval"
  keys = {"image_key": "video", "image_id_key": "video_id"}  # synthetic_tasks.VIDEO_KEYS
  return {
    s: {"type": "json", "path": f"{d}/video_{s}.json", "image_root": f"{d}/videos", **keys}
    for s in ("train", "test")
  }


def get_config(arg=None):
  opts = common.parse_arg(arg)
  task = opts.get("task")
  if task not in ("retrieval", "video_retrieval", "grounding") or not opts.get("data"):
    raise ValueError(f"expected 'task=retrieval|video_retrieval|grounding,data=DIR', got {arg!r}")
  src = sources(opts["data"], task)
  c = common.base_config()
  c.task = task
  c.model.variant = "tiny"
  c.model.image_res = 64
  c.model.dtype = "float32"
  c.data.tokenizer = "minilm"
  c.data.max_tokens = 16
  c.data.randaugment = False
  c.data.hflip = False
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 1
  c.optim.clip_norm = 0.0
  c.eval.batch_size = 8
  if task == "grounding":
    c.optim.lr = 5e-3  # the fresh-ish box head of a random tiny model needs a push in 12 steps
    c.data.region = [src["train"]]
    c.data.max_regions = 1
    c.data.exact_boxes = True
    c.batch.region = 8
    c.batch.region_max_images = 8
    c.eval.evaluators = ("grounding",)
    c.eval.grounding = mlc.ConfigDict(
      {"data": {"val": [src["val"]], "testA": [src["testA"]]}, "png_examples": 0}
    )
    c.train.select_metric = "eval/grounding/val/acc"
  else:
    kind = "video" if task == "video_retrieval" else "image"
    c.data[kind] = [src["train"]]
    c.batch[kind] = 8
    if kind == "video":
      c.model.frame_len = 2
      c.batch.frame_len = 2
    split = "test" if kind == "video" else "val"
    c.eval.evaluators = ("retrieval",)
    c.eval.retrieval = mlc.ConfigDict(
      {"data": {split: [src[split]]}, "kind": kind, "k_test": 4, "itm_chunk": 16}
    )
    c.train.select_metric = f"eval/retrieval/{split}/r_mean"
  c.train.total_steps = 12
  c.train.eval_every = 12
  c.train.log_every = 1
  c.train.ckpt_every = 6
  c.train.keep = 2
  c.train.keep_every = 0
  c.train.export_at_end = False
  return c
