"""X2-VLM large, 1B stage 2 with video (`x2vlm_large_1b_stage2`).

Official settings: docs/fidelity.md#released-configurations.

As base stage 2 with the large model. Global batches = per-GPU x 32 GPUs: image 32 x 32 = 1024;
region 32 x 32 = 1024 texts over 14 x 32 = 448 images; video 20 x 32 = 640 clips of 3 frames.
lr 3e-5, warm-up 1000, 404,595 steps.
"""

from configs import pretrain_base_1b_stage2

WORLD = 32


def get_config(arg=None):
  """The released large-1B stage-2 setting; no argument."""
  del arg
  c = pretrain_base_1b_stage2.get_config()
  c.model.variant = "large"
  c.init.params_dir = "data/x2vlm_large_1b_stage1"
  c.data.tokenizer = "data/bert-large-uncased-12l"
  c.batch.image = 32 * WORLD
  c.batch.region = 32 * WORLD
  c.batch.region_max_images = 14 * WORLD
  c.batch.video = 20 * WORLD
  c.optim.lr = 3e-5
  return c
