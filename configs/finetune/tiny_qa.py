"""The tiny model fine-tuned on the synthetic VQA, NLVR2 and video-QA sets: the tests' config.

  get_config('task=vqa|nlvr2|video_qa,data=DIR')

DIR holds the sets `data_pipelines/synthetic_qa.py` writes at 64 px (DIR/<task>/..., the layout
of tests/test_finetune_qa.py). Global batches of 8, a handful of steps, evaluation on the
held-out split at the end.
"""

import ml_collections as mlc

from configs import common

TASKS = ("vqa", "nlvr2", "video_qa")


def sources(data_dir: str, task: str) -> dict[str, dict]:
  """The source entry of each split under DIR/<task> (synthetic_qa's file names)."""
  d = f"{data_dir}/{task}"
  if task == "vqa":
    return {
      s: {"type": "vqa", "path": f"{d}/vqa_{s}.json", "image_root": f"{d}/images"}
      for s in ("train", "val", "test")
    }
  if task == "nlvr2":
    return {
      s: {"type": "nlvr2", "path": f"{d}/nlvr_{s}.json", "image_root": f"{d}/images"}
      for s in ("train", "dev", "test")
    }
  return {
    s: {
      "type": "video_qa",
      "path": f"{d}/{s}.jsonl",
      "ans2label": f"{d}/train_ans2label.json",
      "frames_root": f"{d}/frames",
      "naming": "msrvtt",
    }
    for s in ("train", "val", "test")
  }


def get_config(arg=None):
  opts = common.parse_arg(arg)
  task = opts.get("task")
  if task not in TASKS or not opts.get("data"):
    raise ValueError(f"expected 'task=vqa|nlvr2|video_qa,data=DIR', got {arg!r}")
  src = sources(opts["data"], task)
  c = common.base_config()
  c.task = task
  c.model.variant = "tiny"
  c.model.image_res = 64
  c.model.dtype = "float32"
  c.data.tokenizer = "minilm"
  c.data.max_tokens = 16
  c.data.randaugment = False
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 1
  c.optim.clip_norm = 0.0
  c.eval.batch_size = 8
  c.eval.evaluators = (task,)
  if task == "vqa":
    c.model.decoder_layers = 2
    c.data.image = [src["train"]]
    c.data.max_answers = 2
    c.data.answer_tokens = 6
    c.batch.image = 8
    c.optim.mult_paths = ("text_decoder",)
    c.eval.vqa = mlc.ConfigDict(
      {
        "data": {"val": [src["val"]]},
        "answer_list": f"{opts['data']}/vqa/answer_list.json",
        "k_test": 4,
      }
    )
    c.train.select_metric = "eval/vqa/val/acc"
  elif task == "nlvr2":
    c.model.cls_labels, c.model.cls_inputs = 2, 2
    c.data.image = [src["train"]]
    c.batch.image = 8
    c.eval.nlvr2 = mlc.ConfigDict({"data": {"dev": [src["dev"]]}})
    c.train.select_metric = "eval/nlvr2/dev/acc"
  else:
    c.model.frame_len, c.batch.frame_len = 2, 2
    c.model.cls_labels = 16
    c.data.video = [src["train"]]
    c.batch.video = 8
    c.eval.video_qa = mlc.ConfigDict({"data": {"val": [src["val"]]}})
    c.train.select_metric = "eval/video_qa/val/acc"
  c.train.total_steps = 12
  c.train.eval_every = 12
  c.train.log_every = 1
  c.train.ckpt_every = 12
  c.train.keep = 1
  c.train.keep_every = 0
  c.train.export_at_end = False
  return c
