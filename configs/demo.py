"""The CPU demo: a small X2-VLM learns the synthetic shapes world in minutes (`make demo`).

Model `demo` (x2vlm_jax/models/config.py, docs/fidelity.md#demo-model): a 192-wide, 4-block ViT
from scratch at 128 px (8x8 patches of 16 px, so a shape spans one to three patches) and the
packaged MiniLM-L6-H384 BERT as the text tower, its last two layers copied into the two fusion
layers (as the official code copies BERT layers 6-11 into the fusion layers,
docs/fidelity.md#initial-weights-from-bert-and-beit-2). Image-text and region batches of the
shapes world (data_pipelines/synthetic.py); evaluation on the held-out world
(`synthetic.HELDOUT_SEED`, disjoint scenes): text<->image retrieval with ITM re-ranking and
grounding of object / relation phrases.

  get_config()              in-memory synthetic sources (no files needed)
  get_config('data=DIR')    JSON-lines files under DIR written by `python -m x2vlm_jax.demo`
                            (DIR/{image,region}_{train,heldout}/part-*.jsonl): the production
                            readers, as `make demo` runs it
  get_config('ci')          the short CI variant (fewer steps, smaller evaluation sets);
                            combinable: 'data=DIR,ci'

Colour words carry most of the captions' meaning here, so the colour-changing RandAugment is
off; captions say "left of" / "at the right", so images are never flipped (`data.hflip`); crops
keep most of the image (scale 0.6-1) so that captions stay true.

What makes the box head learn within a CPU budget (the runs are in docs/evaluation.md, "The
demo"):
  * one rate, 2e-4, for every parameter (lr_mult 1): with 1e-3 on the fresh cross-attention and
    box head, or on the from-scratch ViT, even a box-loss-only run stayed on the mean-box
    plateau for 800 steps;
  * region records without the whole-image caption (WORLD region_caption=False) and 12 region
    texts over 7 images, so a step carries about 12 boxed phrases (was about 4) and no
    duplicated texts;
  * box L1 and GIoU weighted 5 (`loss.term_weights`; 1 officially): with weight 1 the box loss
    was still on its plateau after 900 steps of the full mixture, while box-only training left
    it after about 300;
  * the ViT's absolute position embedding starts from 2-D sine-cosine values (`pos_embed_init`).
"""

import ml_collections as mlc

from configs import common

WORLD = {"image_size": 128, "max_shapes": 2, "region_caption": False}
TRAIN_SIZE = 20_000  # records per kind: more than the run ever reads, so no example repeats
HELDOUT = {"retrieval_images": 100, "grounding_records": 60}
CI_HELDOUT = {"retrieval_images": 50, "grounding_records": 30}


def splits(data_dir: str) -> dict[str, str]:
  """Directory of each generated split under `data_dir` (the layout x2vlm_jax/demo.py writes)."""
  return {
    f"{kind}_{split}": f"{data_dir}/{kind}_{split}"
    for kind in ("image", "region")
    for split in ("train", "heldout")
  }


def get_config(arg=None):
  """Demo run; arg: comma-separated 'data=DIR', 'ci'."""
  opts = common.parse_arg(arg)
  unknown = set(opts) - {"data", "ci"}
  if unknown:
    raise ValueError(f"demo config: unknown options {sorted(unknown)}; known: data=DIR, ci")
  ci = "ci" in opts
  heldout = CI_HELDOUT if ci else HELDOUT
  c = common.base_config()
  c.model.variant = "demo"
  c.model.image_res = 128
  c.model.dtype = "float32"  # CPU: bfloat16 matmuls are emulated and slower
  c.init.bert_dir = "minilm"
  c.data.tokenizer = "minilm"
  c.data.max_tokens = 16  # the longest 2-shape caption is 14 tokens
  c.data.max_masks = 4
  c.data.max_regions = 5
  c.data.randaugment = False
  c.data.crop_scale = (0.6, 1.0)
  c.data.hflip = False

  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top

  if opts.get("data"):
    d = splits(opts["data"])
    c.data.image = [common.source(d["image_train"])]
    c.data.region = [common.source(d["region_train"])]
    eval_image = [common.source(d["image_heldout"])]
    eval_region = [common.source(d["region_heldout"])]
  else:
    c.data.image = [common.synthetic(TRAIN_SIZE, seed=synthetic.TRAIN_SEED, **WORLD)]
    c.data.region = [common.synthetic(TRAIN_SIZE, seed=synthetic.TRAIN_SEED, **WORLD)]
    eval_image = [
      common.synthetic(heldout["retrieval_images"], seed=synthetic.HELDOUT_SEED, **WORLD)
    ]
    eval_region = [
      common.synthetic(heldout["grounding_records"], seed=synthetic.HELDOUT_SEED, **WORLD)
    ]
  c.data.num_workers = 0  # two cores: worker processes would only compete with the step

  c.batch.image = 8
  c.batch.region = 12  # boxed phrases: about 1.8 per image survive the crop
  c.batch.region_max_images = 7
  c.loss.term_weights.box_l1 = 5.0
  c.loss.term_weights.box_giou = 5.0

  c.optim.lr = 2e-4
  c.optim.lr_mult = 1.0
  c.optim.warmup_steps = 20.0
  c.train.total_steps = 60 if ci else 1000
  c.train.log_every = 10
  c.train.ckpt_every = 500
  c.train.keep = 1
  c.train.keep_every = 0
  c.train.export_at_end = False

  c.mesh.data = 1  # one CPU device; XLA uses both cores inside it
  c.eval.evaluators = ("retrieval", "grounding")
  c.eval.batch_size = 32
  c.eval.retrieval = mlc.ConfigDict(
    {"data": eval_image, "k_test": 16, "itm_chunk": 64, "max_images": 0}
  )
  c.eval.grounding = mlc.ConfigDict({"data": eval_region, "max_phrases": 0, "png_examples": 6})
  return c
