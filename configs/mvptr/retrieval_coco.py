"""MVPTR retrieval fine-tuning on COCO at the official settings (configs/mvptr/finetune.py):
96 pairs per GPU x 8, lr 4e-5, 15 epochs, weight decay 0.05, lengths 50 / 30 tags / 50 regions
/ 5 phrases, k_c 128 / k_i 64, linear decay without warm-up, clipping 1.0; from stage 2.

  python train.py --config=configs/mvptr/retrieval_coco.py:spec=DATA/coco_train.yaml,\
pairs=N,val=DATA/coco_val.yaml,stage2=RUNS/mvptr_stage2 --workdir=RUNS/mvptr_coco

spec / val: Oscar-layout spec files of the training and validation splits (docs/mvptr.md#data);
pairs: the training split's caption lines (the epoch length); stage2: the stage-2 workdir.
"""

from configs.mvptr import common as mc
from configs.mvptr import finetune as ft


def get_config(arg=None):
  return ft.retrieval_config(mc.parse(arg, ("spec", "pairs", "val", "stage2")), 96, 15)
