"""The shared base of the fine-tuning configs (docs/finetuning.md).

`finetune_config(task, variant, image_res)` starts from the pre-training base and sets what every
official fine-tuning script shares (docs/fidelity.md, "Optimiser and schedule"): HF AdamW with
weight decay 0.01, `lr_mult` 2 for parameters the checkpoint lacks, linear warm-up over the first
10 % of the steps then linear decay to 0, no gradient clipping, fp32 in the official scripts
(bfloat16 compute here on accelerators, as in pre-training), RandomResizedCrop scale 0.5-1.

The initial weights are not set: pass one of `--config.init.checkpoint=<pre-training workdir>`,
`--config.init.params_dir=<export>/params` or `--config.init.official_th=<x2vlm_*.th>`.
Data paths default to the official file names under `data/finetune/`; point them elsewhere from
the command line or in a copy of the config.

Steps are given per epoch of the known training sets: steps = epochs x ceil(train pairs /
global batch), the official schedule length (docs/fidelity.md#schedule-length).
"""

from __future__ import annotations

import math

import ml_collections as mlc

from configs import common

TOKENIZER = {
  "base": "data/bert-base-uncased",
  "large": "data/bert-large-uncased",
  # The multilingual model (XLM-R text tower, docs/multilingual.md).
  "xlmr_base": "data/xlm-roberta-base",
  "xlmr_large": "data/xlm-roberta-large",
}


def steps_per_epoch(train_pairs: int, global_batch: int) -> int:
  return math.ceil(train_pairs / global_batch)


def finetune_config(task: str, variant: str, image_res: int) -> mlc.ConfigDict:
  """The fine-tuning base for `task` on the `variant` model at `image_res` pixels."""
  if variant not in TOKENIZER:
    raise ValueError(f"variant {variant!r}: expected one of {sorted(TOKENIZER)}")
  c = common.base_config()
  c.task = task
  c.model.variant = variant
  c.model.image_res = image_res
  c.data.tokenizer = TOKENIZER[variant]
  c.data.crop_scale = (0.5, 1.0)
  c.data.num_workers = 6
  c.optim.weight_decay = 0.01
  c.optim.lr_mult = 2.0
  c.optim.clip_norm = 0.0  # no clipping in any official fine-tuning script
  c.optim.warmup_steps = 0.1  # a fraction of the schedule
  c.train.keep_every = 0
  c.eval.batch_size = 64
  return c


def epochs(c: mlc.ConfigDict, n: int, per_epoch: int) -> None:
  """n epochs of `per_epoch` steps; evaluation and a checkpoint after every epoch."""
  c.train.total_steps = n * per_epoch
  c.train.eval_every = per_epoch
  c.train.ckpt_every = per_epoch
  c.train.log_every = min(50, per_epoch)
