"""Shared helpers of the train-step tests: fast CPU compilation, a jitted parameter init, the
naive (official-structure) loss used as the reference, and a NaN-injecting step wrapper.

Compile time dominates these tests on a 2-core CPU. Two XLA CPU options cut it ~5x without
changing any result the tests check (they select how kernels are generated, not what they
compute): backend optimisation level 0 (no LLVM optimisation of the generated kernels) and the
classic elemental emitters instead of the newer fusion emitters. Measured on the tiny model's
value-and-grad: 26.6 s -> 10.8 s; full step of three kinds: 79 s -> 16.5 s (docs/train_step.md).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from data_pipelines import features as F
from x2vlm_jax import losses
from x2vlm_jax import objectives as pl
from x2vlm_jax.models.x2vlm import X2VLM

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def init_params(cfg, seed: int) -> dict:
  """Parameters as a pure dict, built in one jitted call (eager init compiles op by op).

  The 'rbg' key implementation generates random bits with one XLA op instead of a threefry
  kernel per parameter, which makes this init compile several times faster.
  """

  def init(key):
    return nnx.to_pure_dict(nnx.state(X2VLM(cfg, rngs=nnx.Rngs(params=key)), nnx.Param))

  return jax.jit(init, compiler_options=FAST_COMPILE)(jax.random.key(seed, impl="rbg"))


def naive_kind_terms(model, kind: str, b, temp, key, cfg, mesh, itm: bool = True) -> dict:
  """Loss terms of ONE kind computed the official way: the reference of the equivalence test.

  Own vision- and text-tower calls, and every fusion pass with its own vision tokens, so the
  cross-attention K/V are recomputed for every row of every pass as the official code does;
  the passes share one fusion call only to keep the reference quick to compile.
  Returns itc, itm, mlm (+ box_l1, box_giou), as `objectives.merged_terms` does per kind.
  """
  keys = pl.kind_keys(key, cfg)
  valid = b[F.VALID]
  ids, mask = b[F.TEXT_IDS], b[F.TEXT_MASK]
  nb = ids.shape[0]

  if kind == F.VIDEO:
    image_tokens = model.encode_video(b[F.FRAMES], b[F.FRAME_VALID], keys.vision)  # [B, S, Dv]
  else:
    image_tokens = model.encode_image(b[F.PIXELS], keys.vision)  # [N, S, Dv]
  s = image_tokens.shape[1]
  if kind == F.REGION:
    vision, vmask = model.concepts(image_tokens, b[F.PATCH_MASK], b[F.IMAGE_INDEX])
  else:
    vision, vmask = image_tokens, jnp.ones((nb, s), jnp.int32)

  both = model.encode_text(
    jnp.concatenate([ids, b[F.MLM_IDS]]), jnp.concatenate([mask, mask]), keys.text
  )
  text, text_mlm = both[:nb], both[nb:]  # [B, L, Dt] each

  v_feat, t_feat = model.itc_features(vision, text)
  grad_scale = 1.0 / cfg.itc_grad_world_size if cfg.itc_grad_world_size else None
  terms = {"itc": losses.itc_loss(v_feat, t_feat, temp, valid, grad_scale=grad_scale)}

  arange = jnp.arange(nb)
  neg = (
    pl.negatives(keys.negatives, v_feat, t_feat, temp, valid, cfg, mesh)
    if itm
    else (arange, arange)
  )
  neg_img, neg_txt = neg
  # Fusion passes: rows of (text, text mask, vision tokens, vision mask).
  passes = (
    [
      (text, mask, vision, vmask),
      (text, mask, vision[neg_img], vmask[neg_img]),
      (text[neg_txt], mask[neg_txt], vision, vmask),
    ]
    if itm
    else []
  )
  passes.append((text_mlm, mask, vision, vmask))
  if kind == F.REGION:  # box pass: the full image with an all-ones mask
    passes.append(
      (text, mask, jnp.take(image_tokens, b[F.IMAGE_INDEX], axis=0), jnp.ones((nb, s), jnp.int32))
    )
  fused = jnp.split(
    model.fuse(*[jnp.concatenate(c) for c in zip(*passes)], key=keys.fusion), len(passes)
  )

  itm_logits = [model.itm_logits(f) for f in fused[:3]] if itm else None
  mlm_logits = model.mlm_logits(fused[3 if itm else 0], b[F.MLM_POSITIONS])
  box = model.box(fused[-1]) if kind == F.REGION else None
  terms.update(pl.fused_terms(kind, b, itm_logits, mlm_logits, box, neg, itm))
  return terms


def naive_loss_fn(model, batch, key, cfg, mesh=None, itm: bool = True):
  """`objectives.loss_fn` with every kind computed by `naive_kind_terms`."""
  temp = model.temp[...]
  terms = {}
  for i, kind in enumerate(k for k in F.KINDS if k in batch):
    k = None if key is None else jax.random.fold_in(key, i)
    terms[kind] = naive_kind_terms(model, kind, batch[kind], temp, k, cfg, mesh, itm)
  total, metrics = losses.combine(terms, cfg.iter_perc, cfg.term_weights)
  metrics["temperature"] = temp
  return total, metrics


def nan_at_step(step_fn, at: int):
  """A test-only wrapper of a train step: at update number `at` every MLM weight of the first
  kind becomes NaN, so loss and gradients are NaN and the update must be skipped."""

  def faulty(state, batch, key, itm: bool = True):
    kind = next(iter(batch))
    bad = jnp.where(state["step"] == at, jnp.nan, 1.0).astype(jnp.float32)
    fields = dict(batch[kind], **{F.MLM_WEIGHTS: batch[kind][F.MLM_WEIGHTS] * bad})
    return step_fn(state, {**batch, kind: fields}, key, itm)

  return faulty
