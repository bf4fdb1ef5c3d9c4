"""X2-VLM base, 4M pre-training (`x2vlm_base_4m`).

Official settings: docs/fidelity.md#released-configurations.

Global batches = per-GPU x 8 GPUs: image 128 x 8 = 1024; region 128 x 8 = 1024 texts over
50 x 8 = 400 images. Schedule: 101 epochs x 4995 steps = 504,495 steps (paper: 500K).
"""

from configs import common


def get_config(arg=None):
  """The released base-4M setting; no argument."""
  del arg
  c = common.pretrain_config("base")
  c.batch.image = 128 * 8
  c.batch.region = 128 * 8
  c.batch.region_max_images = 50 * 8
  c.loss.iter_perc.region = 1.0
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 2500
  c.train.total_steps = 101 * 4995
  return c
