"""Fine-tuning the CPU demo's pre-trained model on synthetic retrieval and grounding
(`python -m x2vlm_jax.finetune_demo`, docs/finetuning.md#the-fine-tuning-demo).

The model is the pre-training demo's (`configs/demo.py`: model `demo`, 128 px, MiniLM text
tower); the initial weights come from its run (`--config.init.checkpoint=<demo run>`, set by the
driver). The data are the shapes world's fine-tuning sets in the official formats, written by
`data_pipelines/synthetic_tasks.py` under DATA: Karpathy-style retrieval JSON (several captions
per image, image ids) and RefCOCO+-style grounding files (referring expressions that name one
shape of the scene, e.g. "the small red circle left of the square").

  get_config('task=retrieval,data=DIR')   image-text retrieval: ITC with image-id soft targets
                                          + ITM; evaluated on val (selection) and test
  get_config('task=grounding,data=DIR')   box grounding; evaluated on val, testA, testB
  get_config('task=caption,data=DIR')     captioning (the retrieval files); BLEU / CIDEr on
                                          val (selection) and test
  add ',ci' for the short CI variant.

As in the pre-training demo, captions say "left of" / "at the right", so retrieval images are
never flipped and grounding flips only expressions without left/right (the official careful
flip); colour words carry the meaning, so RandAugment is off.
"""

import ml_collections as mlc

from configs import common

WORLD = {"max_shapes": 2}  # the scenes of the pre-training demo (configs/demo.py)
STEPS = {"retrieval": 300, "grounding": 300, "caption": 300}
CI_STEPS = {"retrieval": 40, "grounding": 40, "caption": 40}
SIZES = {  # written by x2vlm_jax/finetune_demo.py (images per split)
  "retrieval": {"n_train": 2000, "n_val": 50, "n_test": 100},
  "grounding": {"n_train": 1000, "n_val": 30, "n_testA": 30, "n_testB": 30},
  "caption": {"n_train": 1000, "n_val": 30, "n_test": 50},
}
CI_SIZES = {
  "retrieval": {"n_train": 400, "n_val": 20, "n_test": 50},
  "grounding": {"n_train": 200, "n_val": 10, "n_testA": 10, "n_testB": 10},
  "caption": {"n_train": 200, "n_val": 10, "n_test": 20},
}


def sources(data_dir: str, task: str) -> dict[str, dict]:
  """The source entry of each split of `task` under `data_dir` (the driver's layout)."""
  d = f"{data_dir}/{task}"
  if task in ("retrieval", "caption"):  # captioning reads the same Karpathy-format files
    return {
      s: {"type": "json", "path": f"{d}/retrieval_{s}.json", "image_root": f"{d}/images"}
      for s in ("train", "val", "test")
    }
  refer = {
    "type": "refcoco",
    "refs": f"{d}/refs(unc).p",
    "instances": f"{d}/instances.json",
    "image_root": f"{d}/images",
  }
  return {
    "train": {**refer, "path": f"{d}/refcoco+_train.json"},
    "val": {**refer, "path": f"{d}/refcoco+_val.json"},
    "testA": {**refer, "path": f"{d}/refcoco+_test.json", "split": "testA"},
    "testB": {**refer, "path": f"{d}/refcoco+_test.json", "split": "testB"},
  }


def _caption(c, src) -> None:
  """Captioning with the official objective and generation (docs/finetuning.md#captioning);
  captions name positions, so no flip and a mild crop."""
  c.data.image = [src["train"]]
  c.data.hflip = False
  c.data.crop_scale = (0.9, 1.0)
  c.data.max_tokens = 30
  c.data.max_masks = 12
  c.data.mask_prob = 0.6
  c.batch.image = 16
  c.eval.evaluators = ("caption",)
  c.eval.caption = mlc.ConfigDict(
    {"data": {"val": [src["val"]], "test": [src["test"]]}, "max_length": 30, "min_length": 5}
  )
  c.train.select_metric = "eval/caption/val/cider"


def get_config(arg=None):
  """arg: 'task=retrieval|grounding,data=DIR[,ci]'."""
  opts = common.parse_arg(arg)
  unknown = set(opts) - {"task", "data", "ci"}
  if unknown or opts.get("task") not in STEPS or not opts.get("data"):
    raise ValueError(
      "finetune demo config: expected 'task=retrieval|grounding|caption,data=DIR[,ci]', "
      f"got {arg!r}"
    )
  task, ci = opts["task"], "ci" in opts
  src = sources(opts["data"], task)
  c = common.base_config()
  c.task = task
  c.model.variant = "demo"
  c.model.image_res = 128
  c.model.dtype = "float32"
  c.data.tokenizer = "minilm"
  c.data.max_tokens = 16
  c.data.randaugment = False
  c.data.crop_scale = (0.6, 1.0)
  c.data.num_workers = 0
  c.eval.batch_size = 32
  if task == "retrieval":
    c.data.image = [src["train"]]
    c.data.hflip = False
    c.data.crop_scale = (0.9, 1.0)  # captions name positions ("at the top left"): keep them true
    c.batch.image = 16
    c.eval.evaluators = ("retrieval",)
    c.eval.retrieval = mlc.ConfigDict(
      {"data": {"val": [src["val"]], "test": [src["test"]]}, "k_test": 16, "itm_chunk": 64}
    )
    c.train.select_metric = "eval/retrieval/val/r_mean"
  elif task == "caption":
    _caption(c, src)
  else:
    c.data.region = [src["train"]]
    c.data.max_regions = 1
    c.data.careful_hflip = True
    c.data.exact_boxes = True
    c.batch.region = 16
    c.batch.region_max_images = 16
    c.eval.evaluators = ("grounding",)
    c.eval.grounding = mlc.ConfigDict(
      {"data": {s: [src[s]] for s in ("val", "testA", "testB")}, "png_examples": 6}
    )
    c.train.select_metric = "eval/grounding/val/acc"
  steps = (CI_STEPS if ci else STEPS)[task]
  c.optim.lr = 5e-5
  c.optim.lr_mult = 1.0
  c.optim.clip_norm = 0.0
  c.optim.warmup_steps = 0.1
  c.train.total_steps = steps
  # The full demo evaluates half-way too (best-checkpoint selection on val); the CI variant only
  # at the end, which is the fine-tuned result the driver reports.
  c.train.eval_every = steps if ci else steps // 2
  c.train.log_every = 10
  c.train.ckpt_every = steps
  c.train.keep = 1
  c.train.keep_every = 0
  c.train.export_at_end = False
  return c
