"""MVPTR stage 2 of the tiny model on the synthetic shapes world (configs/mvptr/tiny_stage1.py),
starting from the parameters of the stage-1 run's newest checkpoint.

  python train.py --config=configs/mvptr/tiny_stage2.py:spec=DIR/train/SPEC,stage1=RUNS/s1 \
      --workdir=RUNS/s2
"""

from configs.mvptr import common as mc
from configs.mvptr import tiny_stage1


def get_config(arg=None):
  opts = mc.parse(arg, ("spec", "stage1"))
  c = tiny_stage1.tiny(2, opts["spec"])
  c.init.checkpoint = opts["stage1"]
  return c
