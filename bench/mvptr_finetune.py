"""Do the MVPTR fine-tuning building blocks learn? A CPU check outside the suite; prints JSON.

  python bench/mvptr_finetune.py [--steps 1000 --batch 16 --lr 1e-3 --dropout 0.0 --seed 0
      --itm_negatives hardest|sample]

A tiny retrieval model (`MvptrConfig.tiny(heads="retrieval")`, random init) is trained with
`tasks_mvptr.retrieval_loss` (VSC + ITM on the new classifier, hardest in-batch negatives) on
synthetic concept data and evaluated on held-out images with
`evaluators.mvptr_retrieval.evaluate_mvptr_retrieval` before and after. Data: 12 concepts, each a
word id and a random region prototype; an image shows two concepts (region = prototype + noise,
plus distractor regions) and its tags name the first; each of its two captions holds both
concept words among random filler words. Train and held-out images use disjoint concept pairs,
so the held-out figures need the concepts, not memorised pairs. Rows are built with
`data_pipelines.mvptr_finetune_examples.pair_fields`. Plain AdamW, no schedule.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import numpy as np
import optax
from flax import nnx

from data_pipelines import mvptr_finetune_examples as X
from data_pipelines.mvptr_examples import MvptrExampleSpec
from x2vlm_jax import tasks_mvptr as TM
from x2vlm_jax.evaluators import mvptr_retrieval as E
from x2vlm_jax.models.mvptr import MVPTR
from x2vlm_jax.models.mvptr_config import MvptrConfig

CONCEPTS = 12
FIRST_CONCEPT_WORD = 10  # word ids 10..21 name the concepts; fillers come from 22..60


def _spec(cfg: MvptrConfig) -> MvptrExampleSpec:
  return MvptrExampleSpec(
    max_tokens=10, max_phrases=2, max_tags=4, max_regions=4, region_dim=cfg.region_dim,
    word_vocab_size=cfg.word_vocab_size, vocab_size=cfg.vocab_size, cls_id=1, sep_id=2,
    mask_id=3, first_word_id=4,
  )  # fmt: skip


def make_split(pairs, cfg, rng, protos):
  """Images (stream B fields) and texts (stream A fields) of concept pairs; 2 texts per image."""
  spec, images, texts, txt2img = _spec(cfg), [], [], []
  for i, (a, b) in enumerate(pairs):
    regions = rng.standard_normal((3, cfg.region_dim)).astype(np.float32)
    regions[:2] = protos[[a, b]] + 0.3 * regions[:2]
    for _ in range(2):
      filler = rng.integers(FIRST_CONCEPT_WORD + CONCEPTS, cfg.word_vocab_size, 4)
      concept_words = [FIRST_CONCEPT_WORD + a, FIRST_CONCEPT_WORD + b]
      words = rng.permutation(np.concatenate([concept_words, filler]))
      row = X.pair_fields(words, [], [FIRST_CONCEPT_WORD + a], regions, spec)
      texts.append(row)
      txt2img.append(i)
    images.append(row)
  stack = lambda rows, keys: {k: np.stack([r[k] for r in rows]) for k in keys}  # noqa: E731
  img = stack(images, ("tag_ids", "tag_mask", "regions", "region_mask"))
  txt = stack(texts, ("text_ids", "text_mask"))
  return img, txt, np.asarray(txt2img)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--itm_negatives", default="hardest", choices=TM.ITM_NEGATIVES)
  args = p.parse_args()
  rng = np.random.default_rng(args.seed)
  cfg = MvptrConfig.tiny(heads="retrieval", dropout=args.dropout)
  protos = rng.standard_normal((CONCEPTS, cfg.region_dim)).astype(np.float32)
  pairs = [tuple(x) for x in rng.permutation(list(itertools.combinations(range(CONCEPTS), 2)))]
  held, train = pairs[:22], pairs[22:]
  tr_img, tr_txt, tr_t2i = make_split(train, cfg, rng, protos)
  te_img, te_txt, te_t2i = make_split(held, cfg, rng, protos)
  model = MVPTR(cfg, rngs=nnx.Rngs(args.seed))
  opt = nnx.Optimizer(model, optax.adamw(args.lr, weight_decay=0.05), wrt=nnx.Param)

  neg = args.itm_negatives

  @nnx.jit
  def step(model, opt, batch, key):
    loss_fn = lambda m: TM.retrieval_loss(m, batch, key, itm_negatives=neg)  # noqa: E731
    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return metrics

  def evaluate():
    return E.evaluate_mvptr_retrieval(model, te_img, te_txt, te_t2i, k_c=8, k_i=4, block=32)

  before = evaluate()
  key, first, last, t0 = jax.random.key(args.seed), None, None, None
  for s in range(args.steps):
    images = rng.choice(len(train), args.batch, replace=False)  # distinct images
    texts = 2 * images + rng.integers(0, 2, args.batch)  # one of each image's two captions
    batch = {k: v[images] for k, v in tr_img.items()} | {k: v[texts] for k, v in tr_txt.items()}
    metrics = step(model, opt, batch, jax.random.fold_in(key, s))
    metrics = {k: float(v) for k, v in metrics.items()}
    first = first or metrics
    if s == 0:
      t0 = time.perf_counter()
    last = metrics
  step_s = (time.perf_counter() - t0) / max(args.steps - 1, 1)
  after = evaluate()
  keys = ("txt_r1", "img_r1", "r_mean")
  print(json.dumps({
    "steps": args.steps, "batch": args.batch, "step_s": round(step_s, 4),
    "train_images": len(train), "held_out_images": len(held),
    "first": first, "last": last,
    "before": {k: before[f"mvptr_retrieval/{k}"] for k in keys}
    | {f"uni_{k}": before[f"mvptr_retrieval_uni/{k}"] for k in keys},
    "after": {k: after[f"mvptr_retrieval/{k}"] for k in keys}
    | {f"uni_{k}": after[f"mvptr_retrieval_uni/{k}"] for k in keys},
  }, indent=1))  # fmt: skip


if __name__ == "__main__":
  main()
