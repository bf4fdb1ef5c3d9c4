"""The tiny model on the synthetic shapes world: the trainer's test and smoke-run config.

Small enough for a laptop CPU: the oddly sized `tiny` model at 64 px (16 patches), captions of
16 tokens from the packaged MiniLM tokenizer, in-memory synthetic sources (no files), global
batches of 4 images and 4 region texts over 2 images. `get_config('video')` adds a video kind
(2 clips of 2 frames); 'aux' adds an aux image stream with p 0.5 (1B stage-1 mechanics).
"""

from configs import common


def get_config(arg=None):
  """Tiny run; arg: comma-separated options 'video', 'aux'."""
  opts = common.parse_arg(arg)
  unknown = set(opts) - {"video", "aux"}
  if unknown:
    raise ValueError(f"tiny config: unknown options {sorted(unknown)}; known: video, aux")
  c = common.base_config()
  c.model.variant = "tiny"
  c.model.image_res = 64
  c.model.dtype = "float32"
  c.data.tokenizer = "minilm"
  c.data.max_tokens = 16
  c.data.max_masks = 4
  c.data.max_regions = 3
  c.data.randaugment = False  # cheaper examples; the ops are tested in the data tests
  c.data.image = [common.synthetic(256, seed=0)]
  c.data.region = [common.synthetic(128, seed=0)]
  c.batch.image = 4
  c.batch.region = 4
  c.batch.region_max_images = 2
  c.batch.frame_len = 2
  if "video" in opts:
    c.model.frame_len = 2
    c.data.video = [common.synthetic(64, seed=0)]
    c.batch.video = 2
  if "aux" in opts:
    c.data.aux.image = [common.synthetic(64, seed=7)]
    c.loss.aux_iter_perc.image = 0.5
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.train.total_steps = 20
  c.train.log_every = 5
  c.train.ckpt_every = 10
  c.train.keep = 2
  c.train.keep_every = 0
  c.train.max_consecutive_nonfinite = 3
  c.train.export_at_end = False
  return c
