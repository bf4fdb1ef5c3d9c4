"""VQA on the real easy-VQA data (the `easy-vqa` package converted to the official VQA format by
`python -m data_pipelines.tools.easy_vqa DIR`): the answer decoder learns it on a CPU
(`python -m x2vlm_jax.vqa_demo`, docs/finetuning.md#the-easy-vqa-demo).

  get_config('data=DIR')       the full run
  get_config('data=DIR,ci')    the short CI variant (tests/test_easy_vqa.py): the tiny ViT with
                               the MiniLM towers, 150 steps, 300 val questions

The model: the demo's architecture (`ModelConfig.demo`: MiniLM-L6-H384 text tower, its layers
4-5 copied into the 2 fusion layers, a 192-wide 4-block ViT from scratch) at the data's 64 px,
with a 2-layer answer decoder initialised from the fusion layers as the official VQA model is
(`init.bert_dir = minilm`: no X2-VLM pre-training; the pre-training demo's 128-px absolute
position table cannot be resized). One answer slot of `[CLS] answer [SEP]` (4 tokens),
questions to 16 tokens; the whole 13-answer list is re-ranked (k_test 13). Crops keep 85-100 %
of the image and RandAugment is off: the questions are about the colour and presence of the one
shape. Evaluated on the package's test set (1,000 images); selected on the val split (the last
200 training images).
"""

import ml_collections as mlc

from configs import common

STEPS, CI_STEPS = 300, 150


def get_config(arg=None):
  opts = common.parse_arg(arg)
  if not opts.get("data") or set(opts) - {"data", "ci"}:
    raise ValueError(f"expected 'data=DIR[,ci]', got {arg!r}")
  d, ci = opts["data"], "ci" in opts
  entry = lambda split: {
    "type": "vqa",
    "path": f"{d}/vqa_{split}.json",
    "image_root": f"{d}/images",
  }
  c = common.base_config()
  c.task = "vqa"
  c.model.variant = "demo"
  c.model.image_res = 64
  c.model.dtype = "float32"
  c.model.text_config_from = "minilm"
  c.model.decoder_layers = 2
  c.init.bert_dir = "minilm"
  c.data.tokenizer = "minilm"
  c.data.image = [entry("train")]
  c.data.max_tokens = 16
  c.data.max_answers = 1
  c.data.answer_tokens = 4
  c.data.randaugment = False
  c.data.crop_scale = (0.85, 1.0)
  c.data.num_workers = 0
  c.batch.image = 32
  c.optim.lr = 2e-4
  c.optim.lr_mult = 1.0
  c.optim.clip_norm = 0.0
  c.optim.warmup_steps = 0.05
  steps = CI_STEPS if ci else STEPS
  if ci:  # the tiny ViT (2 blocks, 36 wide) with the MiniLM text tower: quick on 2 cores
    c.model.variant = "tiny"
    c.batch.image = 16
    c.optim.lr = 5e-4
  c.train.total_steps = steps
  c.train.eval_every = steps
  c.train.log_every = 10 if ci else 50
  c.train.ckpt_every = steps
  c.train.keep = 1
  c.train.keep_every = 0
  c.train.export_at_end = False
  splits = {"val": [entry("val")]} if ci else {"val": [entry("val")], "test": [entry("test")]}
  c.eval.evaluators = ("vqa",)
  c.eval.batch_size = 64
  c.eval.vqa = mlc.ConfigDict(
    {
      "data": splits,
      "answer_list": f"{d}/answer_list.json",
      "k_test": 13,
      "max_questions": 300 if ci else 2000,
    }
  )
  c.train.select_metric = "eval/vqa/val/acc"
  return c
