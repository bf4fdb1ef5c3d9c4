"""X2-VLM large, 1B pre-training stage 1 (`x2vlm_large_1b`).

Official settings: docs/fidelity.md#released-configurations.

As base-1B (aux clean images with p 0.15, ITM only on aux steps until 200K) with the large
model. Global batches = per-GPU x 64 GPUs (the paper's 64 A100; the world size of the released
run is unconfirmed): image 64 x 64 = 4096; region 32 x 64 = 2048 texts over 14 x 64 = 896
images. Schedule: 3 x ceil(1,323,042,683 / 4096) = 969,027 steps.
"""

import math

from configs import common, pretrain_base_1b

WORLD = 64


def get_config(arg=None):
  """The released large-1B stage-1 setting; no argument."""
  del arg
  c = pretrain_base_1b.get_config()
  base = common.pretrain_config("large")
  c.model.variant = "large"
  c.init.bert_dir, c.init.beit_path = base.init.bert_dir, base.init.beit_path
  c.batch.image = 64 * WORLD
  c.batch.region = 32 * WORLD
  c.batch.region_max_images = 14 * WORLD
  c.optim.lr = 5e-5
  c.train.total_steps = 3 * math.ceil(pretrain_base_1b.LAION_PAIRS / c.batch.image)
  return c
