"""Why does ITM stay at ln 2 in the tiny MVPTR runs? A CPU diagnosis outside the suite.

  python bench/mvptr_itm_diag.py [--images 256 --stage1 40 --stage2 400 --lr 1e-3
      --weights vsc=1,itm=10 --negatives paper|uniform]

An in-process replica of the tiny stages (configs/mvptr/tiny_stage1.py / tiny_stage2.py: the same
model, synthetic shapes-world data, weights, AdamW with warm-up 1/5 and linear decay, clip 1.0)
that prints, every 50 stage-2 steps, the terms and: the share of drawn ITM negative pairs whose
image truly matches the caption by the world's ground truth (upper bound: either caption of the
text's image holds for the negative image), the mean match probability of positives and
negatives, the spread of the pooled joint [CLS] across rows, and the entropy of the VSC draw.
`--negatives uniform` draws the ITM / WPG negatives uniformly instead of from the VSC
distribution, `itm_uniform` / `wpg_uniform` only one term's, `--itm_temp` softens the ITM draw,
`--width` changes the stacks' width (diagnoses, not the paper).
Figures: docs/mvptr.md#training.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs.mvptr import tiny_stage1
from data_pipelines import mvptr_synthetic as MS
from data_pipelines import synthetic as S
from data_pipelines.mvptr_oscar import OscarSource, image_key_id
from data_pipelines.mvptr_stream import pretrain_iterator
from x2vlm_jax import mvptr_losses as ML
from x2vlm_jax import mvptr_objectives as MO
from x2vlm_jax import run_config_mvptr as RC
from x2vlm_jax.models.mvptr import MVPTR
from x2vlm_jax.tasks_mvptr_pretrain import objectives_for


def ground_truth(n_images: int):
  """image key id -> (statements true of the image, its two captions in that form)."""
  world, truth = S.ShapesWorld(seed=S.TRAIN_SEED), {}
  for i in range(n_images):
    _, shapes = world.scene(i, "image")
    listing = "L:" + "|".join(sorted(s.phrase() for s in shapes))
    true = {listing} | {
      f"{a.phrase()} {S.relation(a, b)} {b.phrase()}" for a in shapes for b in shapes if a is not b
    }
    if len(shapes) == 1:
      true.add(f"{shapes[0].phrase(with_size=False)} at the {S.where(shapes[0], 64)}")
    caps = [listing, world.record("image", i)["captions"][1]]
    truth[image_key_id(MS.DATASET, str(i))] = (true, caps)
  return truth


def diagnose(model, b, image_ids, key, truth) -> dict:
  """The ITM negatives of `_joint_terms` (same keys) and what the model makes of them."""
  keys = jax.random.split(key, 9)
  text = model.encode_text(b["text_ids"], b["text_mask"])
  vis = model.encode_vision(b["tag_ids"], b["tag_mask"], b["regions"], b["region_mask"])
  t, v = model.global_features(text, vis)
  sim, scale = t @ v.T, model.logit_scale[...]
  hard_img = ML.pick_negatives(keys[3], sim, scale, "sample")
  hard_txt = ML.pick_negatives(keys[4], sim.T, scale, "sample")
  ti, ii = ML.itm_pairs(keys[5], hard_img, hard_txt)
  match = [
    any(c in truth[image_ids[m]][0] for c in truth[image_ids[a]][1]) or image_ids[a] == image_ids[m]
    for a, m in zip(np.asarray(ti), np.asarray(ii))
  ]
  regions = model.region_slots(vis, b["tag_ids"].shape[1])
  pos = model.fuse(text, b["text_mask"], regions, b["region_mask"]).pooled
  neg = model.fuse(text[ti], b["text_mask"][ti], regions[ii], b["region_mask"][ii]).pooled
  p_match = lambda pooled: float(jnp.mean(jax.nn.softmax(model.itm_logits(pooled))[:, 0]))  # noqa: E731
  # The draw's entropy (nats; uniform over the other N - 1 columns: ln(N - 1)): how hard the
  # VSC-drawn negatives have become.
  off = jnp.where(jnp.eye(sim.shape[0], dtype=bool), -jnp.inf, jnp.exp(scale) * sim)
  probs = jax.nn.softmax(off, axis=1)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), axis=1)
  return {
    "draw_entropy": round(float(jnp.mean(entropy)), 3),
    "distinct_image_negatives": len(set(np.asarray(hard_img).tolist())),
    "true_match_negatives": float(np.mean(match)),
    "p_match_pos": p_match(pos),
    "p_match_neg": p_match(neg),
    "pooled_std_rows": float(jnp.std(pos, 0).mean()),
    "pooled_abs": float(jnp.abs(pos).mean()),
  }


def run_stage(stage, model, it, c, args, truth):
  s = objectives_for(
    stage, c.loss.mvptr if stage == 2 else {"weights": {"vsc": c.loss.mvptr.weights.vsc}}
  )
  steps = args.stage1 if stage == 1 else args.stage2
  warm = int(0.2 * steps)
  sched = optax.join_schedules(
    [optax.linear_schedule(0, args.lr, warm), optax.linear_schedule(args.lr, 0, steps - warm)],
    [warm],
  )
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, b, key):
    grad_fn = nnx.value_and_grad(lambda m: MO.pretrain_terms(m, b, key, s), has_aux=True)
    (_, metrics), grads = grad_fn(model)
    opt.update(model, grads)
    return metrics

  hist, t0 = [], time.time()
  for i in range(steps):
    raw = next(it)
    b = {k: jnp.asarray(x) for k, x in raw.items() if k != "image_id"}
    key = jax.random.key(i + 1000 * stage)
    hist.append({k: round(float(x), 4) for k, x in step(model, opt, b, key).items()})
    if stage == 2 and (i % 50 == 0 or i == steps - 1):
      print(i, hist[-1], diagnose(model, b, raw["image_id"], key, truth), flush=True)
  names = [n for n in hist[0] if n.startswith("loss/")]
  mean = lambda part, n: round(float(np.mean([h[n] for h in part])), 3)  # noqa: E731
  falls = {n[5:]: (mean(hist[:10], n), mean(hist[-10:], n)) for n in names}
  print(f"stage {stage} ({time.time() - t0:.0f} s), first vs last 10 steps:", falls, flush=True)


def _patch_draws(negatives: str, itm_temp: float) -> None:
  """Changes one term's negative draw. `mvptr_objectives._joint_terms` calls `pick_negatives`
  three times per trace, in this order: ITM image, ITM text, WPG image; the eager calls of
  `diagnose` are not counted (they see concrete arrays, not tracers)."""
  draw, calls = ML.pick_negatives, [0]

  def patched(k, sim, sc, mode, valid=None, shards=1):
    if isinstance(sim, jax.core.Tracer):
      calls[0] += 1
      term = "itm" if calls[0] % 3 in (1, 2) else "wpg"
      if negatives == f"{term}_uniform":
        mode = "uniform"
      if term == "itm":
        sim = sim * itm_temp
    return draw(k, sim, sc, mode, valid, shards)

  ML.pick_negatives = patched


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--stage1", type=int, default=40)
  p.add_argument("--stage2", type=int, default=400)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--weights", default="", help="stage-2 weights, e.g. vsc=1,itm=10")
  p.add_argument(
    "--negatives",
    choices=("paper", "uniform", "itm_uniform", "wpg_uniform"),
    default="paper",
    help="uniform: ITM and WPG negatives drawn uniformly; itm_/wpg_uniform: only that term's",
  )
  p.add_argument("--itm_temp", type=float, default=1.0, help="ITM draw from softmax(t x logits)")
  p.add_argument("--width", type=int, default=0, help="stack width (heads = width / 32)")
  args = p.parse_args()
  root = tempfile.mkdtemp(prefix="mvptr_itm_")
  spec = MS.write_splits(os.path.join(root, "data"), args.images, 8)["train"]
  c = tiny_stage1.tiny(2, spec)
  mc = RC.model_config(c.model, jnp.float32)
  ex = RC.streams_config(c, mc, type("Sizes", (), {"image_batch": 8})()).spec
  it = pretrain_iterator(OscarSource(spec), ex, 8, 0, 0, 1)
  if args.width:
    c.model.mvptr.update({"width": args.width, "num_heads": args.width // 32})
    c.model.mvptr.mlp_dim = 4 * args.width
  if args.negatives in ("itm_uniform", "wpg_uniform") or args.itm_temp != 1.0:
    _patch_draws(args.negatives, args.itm_temp)
  if args.negatives == "uniform":  # the terms draw through this module attribute
    draw = ML.pick_negatives
    ML.pick_negatives = lambda k, sim, sc, mode, valid=None, shards=1: draw(
      k, sim, sc, "uniform" if mode == "sample" else mode, valid, shards
    )
  model, truth = MVPTR(mc, rngs=nnx.Rngs(0)), ground_truth(args.images)
  run_stage(1, model, it, c, args, truth)
  for kv in filter(None, args.weights.split(",")):
    name, w = kv.split("=")
    c.loss.mvptr.weights[name] = float(w)
  run_stage(2, model, it, c, args, truth)


if __name__ == "__main__":
  main()
