"""MVPTR phrase-grounding fine-tuning of the tiny model on the synthetic shapes world (CPU): one
row per grounded phrase of the training layout (exact targets: `mvptr_synthetic.
grounding_targets`), the paper's variant (mean of the phrase's tokens vs the regions, last
layer, cosine regressed on IoU), from a tiny stage-2 run as configs/mvptr/tiny_retrieval.py.
Not the code's variant: its query is the joint [CLS], which cannot tell which of a caption's
several phrases to ground (the code grounds RefCOCO expressions, one per text).

  python train.py --config=configs/mvptr/tiny_grounding.py:spec=DIR/train/SPEC,\
val=DIR/heldout/SPEC,stage2=RUNS/s2 --workdir=RUNS/grd

Held-out accuracy (IoU > 0.5) every 100 steps, the best kept.
"""

import ml_collections as mlc

from configs.mvptr import common as mc
from configs.mvptr import finetune as ft
from configs.mvptr.tiny_retrieval import tiny_finetune, tiny_schedule


def get_config(arg=None):
  opts = mc.parse(arg, ("spec", "val", "stage2"))
  c = tiny_finetune("mvptr_grounding", "grounding", opts)
  c.loss.mvptr = mlc.ConfigDict({"grounding": "paper"})
  return tiny_schedule(c, ft.grounding_eval(opts["val"], "paper", split="heldout"), "acc")
