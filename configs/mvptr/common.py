"""The shared base of the MVPTR pre-training configs (docs/mvptr.md#training): the two stages of
the paper on the one training loop, as tasks `mvptr_stage1` / `mvptr_stage2`.

Paper settings (MVPTR_REFERENCE.md section 4): AdamW, global batch 1024, peak lr 1e-4 in both
stages, linear warm-up over the first 1/5 of the steps then linear decay to 0, dropout 0.1,
weight decay 0.01 except biases and LayerNorms (the code's list), Adam eps 1e-8 and betas
(0.9, 0.999) (the released code's `pytorch_transformers` AdamW); stage 1 15 epochs, stage 2 30;
lengths: tokens 35, phrases 5, tags 20, regions 50. The paper states no gradient clipping; the
code's DeepSpeed config clips at 10.0, which is what we use. No learning-rate multiplier for new
parameters (an MVPTR run has no fresh group).
"""

from __future__ import annotations

import math

import ml_collections as mlc

from configs import common

GLOBAL_BATCH = 1024
EPOCHS = {1: 15, 2: 30}


def data_section(spec: str) -> mlc.ConfigDict:
  """`data.mvptr`: the Oscar-layout dataset spec file and the example lengths / masking rates
  (run_config_mvptr.streams_config; the table and region sizes come from the model)."""
  return mlc.ConfigDict(
    {
      "spec": spec,  # the dataset spec file (the official yaml, or JSON)
      "data_dir": "",  # replaces the spec file's directory for the feature paths ('' = none)
      "index_cache_dir": "",  # on-disk line-offset indices ('' = next to the files)
      "max_tokens": 35,
      "max_phrases": 5,
      "max_tags": 20,
      "max_regions": 50,
      "word_rate": 0.15,
      "tag_rate": 0.25,  # paper: tags masked with p 0.25 (the code: 0.15)
      "phrase_rate": 0.15,
      "cls_id": 101,
      "sep_id": 102,
      "mask_id": 103,
      "first_word_id": 999,
    }
  )


def loss_section(stage: int) -> mlc.ConfigDict:
  """`loss.mvptr`: the paper variant of every objective; the stage's objectives at weight 1
  (listed, so a command line can change one: `--config.loss.mvptr.weights.wpg=0.5`)."""
  variants = {n: "paper" for n in ("mcr_v", "mcr_s", "vsc", "wpg", "itm")}
  names = ("mcr_v", "mcr_s", "vsc") + (("wpg", "itm", "mlm") if stage == 2 else ())
  return mlc.ConfigDict({**variants, "vsc_shards": 1, "weights": {n: 1.0 for n in names}})


def stage_config(stage: int, variant: str = "base") -> mlc.ConfigDict:
  """Stage 1 or 2 of MVPTR (no data, no steps: the stage files set them)."""
  c = common.base_config()
  c.task = f"mvptr_stage{stage}"
  c.model.family = "mvptr"
  c.model.variant = variant
  # The paper's textual MCR needs its phrase head (not in the released weights).
  c.model.mvptr = mlc.ConfigDict({"phrase_head": True})
  c.init.phrase_words = ""  # JSON {phrase id: word-piece ids} for the BERT phrase rows
  c.data.tokenizer = "data/bert-base-uncased"  # captions -> bert-base-uncased word pieces
  c.data.mvptr = data_section("")
  c.loss.mvptr = loss_section(stage)
  c.batch.image = GLOBAL_BATCH
  c.optim.lr = 1e-4
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.01
  c.optim.lr_mult = 1.0
  c.optim.clip_norm = 10.0
  c.optim.warmup_steps = 0.2  # a fraction of the steps
  return c


def steps(stage: int, pairs: int, batch: int = GLOBAL_BATCH) -> int:
  """The stage's epochs over `pairs` image-text pairs, in updates of `batch`."""
  return math.ceil(EPOCHS[stage] * pairs / batch)


def parse(arg: str | None, needs: tuple[str, ...]) -> dict[str, str]:
  """The config string's options; the ones in `needs` must be given."""
  opts = common.parse_arg(arg)
  missing = [k for k in needs if not opts.get(k)]
  if missing:
    raise ValueError(f"MVPTR config: give {', '.join(f'{k}=...' for k in missing)} (got {arg!r})")
  return opts
