"""MVPTR phrase-grounding fine-tuning at the official settings (`run_re.py` README command;
MVPTR_REFERENCE.md section 5): 64 rows per GPU x 8, lr 4e-5, 25 epochs, weight decay 0.05,
lengths 30 tokens / 20 tags / 50 regions / 5 phrases, linear decay without warm-up, clipping
1.0; from stage 2. One training row per grounded phrase; the cosine of the query and each region
regressed onto their IoU with the phrase's box; accuracy = IoU > 0.5 of the best region.

  python train.py --config=configs/mvptr/grounding.py:spec=DATA/train/SPEC,rows=N,\
val=DATA/val/SPEC,stage2=RUNS/mvptr_stage2[,variant=code] --workdir=RUNS/mvptr_grounding

spec / val: Oscar-layout spec files whose directory holds `grounding.json` (the region-record
converter `data_pipelines/tools/mvptr_convert.py` writes it from records with boxes and phrases,
e.g. Flickr30K Entities or RefCOCO converted to our region JSON lines); rows: the training
split's grounded phrases (the epoch length; the converter's summary prints `grounded_phrases`);
variant: `paper` (default: the paper's Flickr30K Entities head, mean of the phrase's tokens) or
`code` (the released `run_re.py`: the joint [CLS], one expression per text).
"""

import math

import ml_collections as mlc

from configs.mvptr import common as mc
from configs.mvptr import finetune as ft


def get_config(arg=None):
  opts = mc.parse(arg, ("spec", "rows", "val", "stage2"))
  variant = opts.get("variant") or "paper"
  c = ft.finetune_config("mvptr_grounding", "grounding")
  c.data.mvptr.update(
    {"spec": opts["spec"], "max_tokens": 30, "max_tags": 20, "max_regions": 50, "max_phrases": 5}
  )
  c.loss.mvptr = mlc.ConfigDict({"grounding": variant})
  c.init.checkpoint = opts["stage2"]
  c.batch.image = 64 * ft.GPUS
  c.optim.lr = 4e-5
  c.train.total_steps = ft.steps(25, int(opts["rows"]), c.batch.image)
  c.train.eval_every = math.ceil(int(opts["rows"]) / c.batch.image)  # once per epoch
  c.eval.evaluators = ("mvptr_grounding",)
  c.eval.mvptr_grounding = ft.grounding_eval(opts["val"], variant)
  c.train.select_metric = "eval/mvptr_grounding/val/acc"
  return c
