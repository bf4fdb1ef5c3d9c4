"""The tiny XLM-R model fine-tuned for retrieval on the synthetic multilingual shapes world: the
multilingual fine-tuning test's config (docs/multilingual.md#synthetic-data).

  get_config('data=DIR,tokenizer=TOKDIR[,langs=en+de+zh]')

DIR holds what `data_pipelines.synthetic_multilingual.write_multilingual_retrieval` writes
(`{train,val,test}.<lang>.json`, `images/`), TOKDIR an XLM-R tokenizer directory
(`data_pipelines.spm_tokenizer.train_xlmr_tokenizer`). The training files of all languages are
read as one set (as `XRetrieval.py` does); evaluation reports every language's test split and
their mean, the same evaluator as English retrieval.
"""

import ml_collections as mlc

from configs import common
from configs.finetune import retrieval_multilingual as rm
from data_pipelines.synthetic_multilingual import LANGUAGES


def get_config(arg=None):
  opts = common.parse_arg(arg)
  if not opts.get("data") or not opts.get("tokenizer"):
    raise ValueError(f"expected 'data=DIR,tokenizer=TOKDIR[,langs=en+de+zh]', got {arg!r}")
  d = opts["data"]
  langs = tuple(opts["langs"].split("+")) if opts.get("langs") else LANGUAGES
  files = {s: {lang: f"{d}/{s}.{lang}.json" for lang in langs} for s in ("train", "test")}
  c = common.base_config()
  c.task = "retrieval"
  c.model.variant = "xlmr_tiny"
  c.model.image_res = 64
  c.model.dtype = "float32"
  c.data.tokenizer = opts["tokenizer"]
  c.data.max_tokens = 24
  c.data.mask_whole_word = False
  c.data.randaugment = False
  c.data.hflip = False
  c.batch.image = 16
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 4
  c.optim.clip_norm = 0.0
  c.eval.batch_size = 8
  rm.multilingual_retrieval(c, files["train"], files["test"], f"{d}/images", k_test=4)
  c.eval.retrieval.itm_chunk = 16
  # From scratch, ITC and then ITM need a few hundred steps (measured: docs/multilingual.md).
  c.train.total_steps = 400
  c.train.eval_every = 400
  c.train.log_every = 50
  c.train.ckpt_every = 400
  c.train.keep = 1
  c.train.keep_every = 0
  c.train.export_at_end = False
  return mlc.ConfigDict(c)
