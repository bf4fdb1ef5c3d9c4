"""MVPTR SNLI-VE fine-tuning at the official settings (`run_ve.py` README command;
MVPTR_REFERENCE.md section 5): 64 pairs per GPU x 8, lr 4e-5, 25 epochs (README; the paper: 5),
dropout 0.1, weight decay 0.05, lengths 70 tokens / 20 tags / 70 regions / 5 phrases, 3-way
classifier on the pooler, linear decay without warm-up, clipping 1.0.

  python train.py --config=configs/mvptr/snli_ve.py:spec=DATA/ve_train.json,pairs=N,\
val=DATA/ve_dev.json,stage2=RUNS/mvptr_stage2 --workdir=RUNS/mvptr_ve

spec / val: task specs of the training and dev pairs (docs/mvptr.md#vqa-and-snli-ve-data);
pairs: the training pairs (the epoch length).
"""

from configs.mvptr import common as mc
from configs.mvptr import finetune as ft


def get_config(arg=None):
  opts = mc.parse(arg, ("spec", "pairs", "val", "stage2"))
  lengths = {"max_tokens": 70, "max_tags": 20, "max_regions": 70, "max_phrases": 5}
  c = ft.task_config("mvptr_ve", opts, 64, 25, lengths)
  c.optim.lr = 4e-5
  return c
