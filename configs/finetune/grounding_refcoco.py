"""Referring-expression grounding with boxes on RefCOCO+ (the released `refcoco_grounding_large`).

Released settings: 384 px, batch 20 per GPU (160 global on the 8 GPUs assumed here), max_tokens
40, lr 1e-5 (x2 for fresh parameters, inactive in the official multi-GPU run), weight decay 0.01,
10 epochs, warm-up 10 %, careful flip (no flip when the expression says left/right), text and
fusion drop path 0.1; the crop around the box and colour-only RandAugment of pre-training's
region transform. Data: the official split files (`refcoco+_{train,val,test}.json`: image, text,
ref_id) with the REFER annotations (`refs(unc).p`, `instances.json`); 120,624 training
expressions. Metric: accuracy at IoU >= 0.5 on val, testA, testB; selected on val.
Reported (large 4M): 86.9 / 90.1 / 80.2; base 4M 85.4 / 89.2 / 77.3.

  get_config('large') | get_config('base')
"""

import ml_collections as mlc

from configs import common
from configs.finetune import common as ft

TRAIN_EXPRESSIONS, BATCH = 120_624, 160
REFER = "data/finetune/refcoco+"


def _entry(split_file: str, split=None):
  extra = {"split": split} if split else {}
  return common.source(
    f"{REFER}/refcoco+_{split_file}.json",
    type="refcoco",
    refs=f"{REFER}/refs(unc).p",
    instances=f"{REFER}/instances.json",
    image_root="data/images/coco",
    **extra,
  )


def get_config(arg=None):
  c = ft.finetune_config("grounding", arg or "large", 384)
  c.data.region = [_entry("train")]
  c.data.max_tokens = 40
  c.model.text_drop_path = 0.1
  c.model.fusion_drop_path = 0.1
  c.data.max_regions = 1  # one expression per image crop
  c.data.careful_hflip = True
  c.data.exact_boxes = True  # the grounding dataset keeps fractional boxes
  c.batch.region = BATCH
  c.batch.region_max_images = BATCH
  # The official script wraps the model in DDP before building the optimizer, so no parameter
  # gets lr_mult in its multi-GPU runs (docs/finetuning.md#lr_mult-quirk).
  c.optim.lr_mult = 1.0
  c.optim.lr = 1e-5
  ft.epochs(c, 10, ft.steps_per_epoch(TRAIN_EXPRESSIONS, BATCH))
  c.eval.evaluators = ("grounding",)
  c.eval.grounding = mlc.ConfigDict(
    {
      "data": {
        "val": [_entry("val")],
        "testA": [_entry("test", "testA")],
        "testB": [_entry("test", "testB")],
      }
    }
  )
  c.train.select_metric = "eval/grounding/val/acc"
  return c
