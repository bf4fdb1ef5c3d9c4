"""VQA v2 with the official answer decoder: the released `vqa2_base` / `vqa2_large` settings
(docs/finetuning.md#vqa-v2).

Released: 768 px, questions to 40 tokens, a 6-layer answer decoder initialised from the fusion
layers (`model.decoder_layers`), `large_lr_for_dec` (the whole decoder at lr x lr_mult 2:
`optim.mult_paths`), AdamW lr 4e-5 with vision 2e-5 and text 4e-5 (large: 2e-5), weight decay
0.01, 5 epochs, linear warm-up 10 % (large 5 %); base 8 per GPU x 16 GPUs = 128, large 2 x 32 x 2
accumulation steps = 128; `k_test` 128 answers re-ranked, evaluation batch 32; training files
vqa_train.json + vqa_val.json + vg_qa.json (VQA answers weighted by their share of the 10
annotators, Visual Genome answers 0.5), the 3,129-answer list, images flipped only when no
"left" / "right" is in the question or an answer. Evaluation: the test file (test-dev / std has
no answers: only the result JSON for the EvalAI server is written) after every epoch; the
official script saves every epoch from the third on and selects nothing.
Schedule length: 5 epochs of the VQA v2 train + val questions (443,757 + 214,354) / 128; the
size of the official vg_qa.json is not recorded here -- with it, set `train.total_steps` to
5 x ceil(all training questions / 128).
Reported (test-dev / test-std): base 4M 79.2 / 79.3, large 4M 80.5 / 80.5, base 1B 80.4 / 80.2,
large 1B 81.9 / 81.8.

  get_config('base') | get_config('large')
"""

import ml_collections as mlc

from configs import common
from configs.finetune import common as ft

TRAIN_QUESTIONS, BATCH = 443_757 + 214_354, 128
D = "data/finetune"


def vqa_entry(name: str) -> dict:
  return common.source(
    f"{D}/{name}.json", type="vqa", image_root="images/coco", vg_root="images/visualgenome"
  )


def get_config(arg=None):
  variant = arg or "base"
  c = ft.finetune_config("vqa", variant, 768)
  c.model.decoder_layers = 6
  c.data.image = [vqa_entry("vqa_train"), vqa_entry("vqa_val"), vqa_entry("vg_qa")]
  c.data.max_tokens = 40
  c.data.max_answers = 10  # distinct answers kept per question (10 annotators)
  c.data.answer_tokens = 10  # [CLS] + up to 8 answer pieces + [SEP]
  c.batch.image = BATCH
  if variant == "large":
    c.train.accum_steps = 2
  c.optim.lr = 4e-5
  c.optim.vision_lr = 2e-5
  c.optim.text_lr = 4e-5 if variant == "base" else 2e-5
  c.optim.lr_mult = 2.0
  c.optim.mult_paths = ("text_decoder",)  # large_lr_for_dec
  c.optim.warmup_steps = 0.1 if variant == "base" else 0.05
  ft.epochs(c, 5, ft.steps_per_epoch(TRAIN_QUESTIONS, BATCH))
  c.eval.evaluators = ("vqa",)
  c.eval.batch_size = 32
  c.eval.vqa = mlc.ConfigDict(
    {
      "data": {"test": [vqa_entry("vqa_test")]},
      "answer_list": f"{D}/answer_list.json",
      "k_test": 128,
    }
  )
  return c
