"""NLVR2: a statement about a pair of images, true or false (docs/finetuning.md#nlvr2).

Known: 384 px (paper); the model of the official code: both images through the vision tower,
the sentence fused with each, the two fused [CLS] concatenated into a new `cls_head`
build_mlp(2 D, 2) (`model.cls_labels` 2, `model.cls_inputs` 2); sentences cleaned to 30 words;
both images with the training transform (crop, flip, RandAugment). Not released, reconstructed
from the predecessor X-VLM's NLVR2 config: batch 10 per GPU x 8 = 80, lr 3e-5, 10 epochs,
warm-up 10 %; lr_mult inactive (the official script wraps the model in DDP before building the
optimizer, docs/finetuning.md#lr_mult-quirk). 86,373 training pairs (nlvr_train.json); dev and
test-P evaluated after every epoch. The official script keeps the best mean of dev and test
accuracy; we select on dev. X2-VLM ships no NLVR2-specific pre-training step (X-VLM's
"text assignment" step is not run; docs/finetuning.md#nlvr2).
Reported (dev / test-P): base 4M 85.9 / 86.1, large 4M 87.2 / 87.6, base 1B 86.2 / 87.0,
large 1B 88.7 / 89.4.

  get_config('base') | get_config('large')
"""

import ml_collections as mlc

from configs import common
from configs.finetune import common as ft

TRAIN_PAIRS, BATCH = 86_373, 80
D = "data/finetune"


def entry(split: str) -> dict:
  return common.source(f"{D}/nlvr_{split}.json", type="nlvr2", image_root="images/nlvr2")


def get_config(arg=None):
  c = ft.finetune_config("nlvr2", arg or "base", 384)
  c.model.cls_labels = 2
  c.model.cls_inputs = 2
  c.data.image = [entry("train")]
  c.data.max_tokens = 30
  c.batch.image = BATCH
  c.optim.lr = 3e-5
  c.optim.lr_mult = 1.0  # DDP-before-optimizer quirk
  ft.epochs(c, 10, ft.steps_per_epoch(TRAIN_PAIRS, BATCH))
  c.eval.evaluators = ("nlvr2",)
  c.eval.nlvr2 = mlc.ConfigDict({"data": {"dev": [entry("dev")], "test": [entry("test")]}})
  c.train.select_metric = "eval/nlvr2/dev/acc"
  return c
