"""MVPTR stage 2 at the paper's settings (configs/mvptr/common.py): all six objectives, 30
epochs, starting from the parameters of stage 1's newest checkpoint (not its optimizer state).

  python train.py \
      --config=configs/mvptr/stage2.py:spec=DATA/pretrain.yaml,pairs=N,stage1=RUNS/mvptr_stage1 \
      --workdir=RUNS/mvptr_stage2
"""

from configs.mvptr import common as mc


def get_config(arg=None):
  opts = mc.parse(arg, ("spec", "pairs", "stage1"))
  c = mc.stage_config(2)
  c.data.mvptr.spec = opts["spec"]
  c.init.checkpoint = opts["stage1"]
  c.train.total_steps = mc.steps(2, int(opts["pairs"]))
  return c
