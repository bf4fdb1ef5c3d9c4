"""X2-VLM base, 1B pre-training stage 1 (`x2vlm_base_1b`).

Official settings: docs/fidelity.md#released-configurations, docs/fidelity.md#aux-streams,
docs/fidelity.md#itm-gating.

Main image stream: filtered LAION (1,323,042,683 pairs). On 15 % of the steps (a coin drawn
from (seed, step)) the image batch comes from the clean aux stream (COCO, VG, SBU, CC3M, CC12M)
and ITM is computed (until step 200K); on the other 85 % ITM is off for images AND regions.
Global batches = per-GPU x 24 GPUs (config comment; the paper says 32 A100): image
128 x 24 = 3072; region 64 x 24 = 1536 texts over 26 x 24 = 624 images, iter_perc 0.5.
Schedule: 3 epochs of the LAION data = 3 x ceil(1,323,042,683 / 3072) = 1,292,034 steps.
"""

import math

from configs import common

WORLD = 24
LAION_PAIRS = 1_323_042_683


def get_config(arg=None):
  """The released base-1B stage-1 setting; no argument."""
  del arg
  c = common.pretrain_config("base")
  c.data.max_tokens = 30
  c.data.aux.image = list(c.data.image) + [common.source("data/pretrain_4m/cc12m")]
  c.data.image = [
    common.source("data/pretrain_1b/laion_filtered"),
    common.source("data/pretrain_1b/laion2b_filtered"),
  ]
  c.loss.aux_iter_perc.image = 0.15
  c.loss.stop_calc_itm = 200_000
  common.use_1b_regions(c)
  c.batch.image = 128 * WORLD
  c.batch.region = 64 * WORLD
  c.batch.region_max_images = 26 * WORLD
  c.loss.iter_perc.region = 0.5
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 2500
  c.train.total_steps = 3 * math.ceil(LAION_PAIRS / c.batch.image)
  return c
