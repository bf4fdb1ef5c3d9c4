"""MVPTR SNLI-VE fine-tuning of the tiny model on the synthetic shapes world (CPU): hypotheses
the scene entails, contradicts or leaves open (`data_pipelines/mvptr_synthetic_qa.py`, written
in the official `run_ve.py` files), from a tiny stage-2 run as configs/mvptr/tiny_retrieval.py.

  python train.py --config=configs/mvptr/tiny_ve.py:spec=DIR/train/ve.json,\
val=DIR/heldout/ve.json,stage2=RUNS/s2 --workdir=RUNS/ve

Held-out accuracy every 100 steps, the best kept.
"""

from configs.mvptr import common as mc
from configs.mvptr import finetune as ft
from configs.mvptr.tiny_retrieval import tiny_finetune, tiny_schedule


def get_config(arg=None):
  opts = mc.parse(arg, ("spec", "val", "stage2"))
  c = tiny_finetune("mvptr_ve", "ve", opts)
  return tiny_schedule(c, ft.task_eval(opts["val"], split="heldout"), "acc")
