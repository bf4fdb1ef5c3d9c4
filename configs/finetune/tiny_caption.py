"""The tiny model fine-tuned for captioning on the synthetic shapes world: the tests' config.

  get_config('data=DIR')

DIR holds the Karpathy-format set `synthetic_tasks.write_retrieval` writes at 64 px (train: one
entry per caption; val: one per image with its captions). Captions to 24 tokens with up to 10
masks, global batches of 8, a constant learning rate over 100 steps, generation with the
official rules over at most 10 steps.
"""

import ml_collections as mlc

from configs import common

STEPS = 100


def sources(data_dir: str) -> dict[str, dict]:
  """The image-kind source entry of each split (write_retrieval's file names)."""
  return {
    s: {
      "type": "json",
      "path": f"{data_dir}/retrieval_{s}.json",
      "image_root": f"{data_dir}/images",
    }
    for s in ("train", "val", "test")
  }


def get_config(arg=None):
  opts = common.parse_arg(arg)
  if not opts.get("data"):
    raise ValueError(f"expected 'data=DIR', got {arg!r}")
  src = sources(opts["data"])
  c = common.base_config()
  c.task = "caption"
  c.model.variant = "tiny"
  c.model.image_res = 64
  c.model.dtype = "float32"
  c.data.tokenizer = "minilm"
  c.data.image = [src["train"]]
  c.data.max_tokens = 24
  c.data.max_masks = 10
  c.data.mask_prob = 0.6
  c.data.randaugment = False
  c.data.hflip = False
  c.batch.image = 8
  c.optim.lr = 5e-3
  c.optim.min_lr = 5e-3  # constant: a short run from a random tiny model needs every step
  c.optim.warmup_steps = 1
  c.optim.clip_norm = 0.0
  c.eval.batch_size = 8
  c.eval.evaluators = ("caption",)
  c.eval.caption = mlc.ConfigDict(
    {"data": {"val": [src["val"]]}, "max_length": 10, "min_length": 3, "num_beams": 3}
  )
  c.train.select_metric = "eval/caption/val/cider"
  c.train.total_steps = STEPS
  c.train.eval_every = STEPS
  c.train.log_every = 10
  c.train.ckpt_every = STEPS
  c.train.keep = 1
  c.train.keep_every = 0
  c.train.export_at_end = False
  return c
