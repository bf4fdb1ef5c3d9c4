"""X2-VLM base, 1B stage 2 with video (`x2vlm_base_1b_stage2`).

Official settings: docs/fidelity.md#released-configurations,
docs/fidelity.md#continued-pre-training.

Continues from the stage-1 weights (`init.params_dir`, or `init.official_th` for a released
`.th`); the frame embedding, missing there, is fresh and gets lr x 2. Data: the 4M image set,
the 8 region sources (iter_perc 1.0), video from HowTo100M + YT-Temporal with WebVid-2.5M as the
aux stream on 35 % of the steps, 3 frames. Global batches = per-GPU x 16 GPUs: image
64 x 16 = 1024; region 64 x 16 = 1024 texts over 26 x 16 = 416 images; video 40 x 16 = 640.
Schedule: 81 x 4995 = 404,595 steps ("400k").
"""

from configs import common

WORLD = 16


def get_config(arg=None):
  """The released base-1B stage-2 setting; no argument."""
  del arg
  c = common.pretrain_config("base")
  c.init.bert_dir = ""
  c.init.beit_path = ""
  c.init.params_dir = "data/x2vlm_base_1b_stage1"
  c.data.tokenizer = "data/bert-base-uncased"
  common.use_1b_regions(c)
  common.use_video(c, per_gpu=40, world=WORLD)
  c.batch.image = 64 * WORLD
  c.batch.region = 64 * WORLD
  c.batch.region_max_images = 26 * WORLD
  c.loss.iter_perc.region = 1.0
  c.optim.lr = 6e-5
  c.optim.warmup_steps = 1000
  c.train.total_steps = 81 * 4995
  return c
