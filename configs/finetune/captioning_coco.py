"""COCO captioning (Karpathy split) with the MLM head, left to right: the released
`coco_captioning_large` settings (docs/finetuning.md#captioning).

Released (large only): 384 px (the paper says 480), `[CLS] a picture of` + the raw caption to
40 tokens, FG-free masking (mask_prob 0.6 after the prompt, at most 18 masks, whole words,
spans of 2-3 with p 0.2, a [MASK] inserted before each masked token), label smoothing 0.1;
AdamW lr 5e-6 (vision 1e-5, text 5e-6; the fusion layers are the official text encoder's
upper layers: 5e-6), lr_mult 2 (no parameter is new), weight decay 0.01, 5 epochs, linear
warm-up 5 %; batch 16 per GPU on "8 or 16" GPUs (the author's words): 128 here. Generation:
beam 3, max_length 50, min_length 5, length_penalty 0, trigram blocking, test batch 20.
The official script evaluates the test split every epoch and keeps the best BLEU-4 + CIDEr;
here val and test are evaluated and val CIDEr selects. The base variant uses the same settings
(no base config was released).
Schedule length: 5 epochs of the 566,747 Karpathy training captions / 128.
Reported BLEU-4 / CIDEr (COCO Karpathy test): base 4M 41.0 / 133.6, large 4M 42.0 / 136.7,
base 1B 41.7 / 136.1, large 1B 42.6 / 139.1.

  get_config('large') | get_config('base')
"""

import ml_collections as mlc

from configs import common
from configs.finetune import common as ft

TRAIN_CAPTIONS, BATCH = 566_747, 128
D = "data/finetune/coco_karpathy"


def karpathy(split: str) -> dict:
  return common.source(f"{D}/coco_karpathy_{split}.json", type="json", image_root="images/coco")


def get_config(arg=None):
  variant = arg or "large"
  c = ft.finetune_config("caption", variant, 384)
  c.data.image = [karpathy("train")]
  c.data.max_tokens = 40
  c.data.max_masks = 18
  c.data.mask_prob = 0.6
  c.data.caption_prompt = "a picture of"
  c.loss.label_smoothing = 0.1
  c.batch.image = BATCH
  c.optim.lr = 5e-6
  c.optim.vision_lr = 1e-5
  c.optim.text_lr = 5e-6
  c.optim.fusion_lr = 5e-6
  c.optim.warmup_steps = 0.05
  ft.epochs(c, 5, ft.steps_per_epoch(TRAIN_CAPTIONS, BATCH))
  c.eval.evaluators = ("caption",)
  c.eval.batch_size = 20
  c.eval.caption = mlc.ConfigDict(
    {
      "data": {"val": [karpathy("val")], "test": [karpathy("test")]},
      "prompt": "a picture of",
      "num_beams": 3,
      "max_length": 50,
      "min_length": 5,
      "length_penalty": 0.0,
    }
  )
  c.train.select_metric = "eval/caption/val/cider"
  return c
