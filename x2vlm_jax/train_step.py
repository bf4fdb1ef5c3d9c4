"""The pre-training step: four losses over image, region/object and video batches in one jit.

One step = per kind (reference §6.4): the vision tower once per image / frame, region concepts
from their image's patch tokens (§2), the unmasked text and the masked (MLM) text encoded in one
text-tower call, then every fusion pass of the kind (ITM positives, both kinds of hard negatives,
MLM, and for regions the box pass on the full image) in ONE fusion call whose cross-attention
keys/values were computed once per vision sequence (`X2VLM.vision_kv`). The official code
recomputes K/V for every pass; the result is identical (tested against `naive=True`).

The state is a plain dict pytree so it checkpoints as is:
  {'params': nested dict of arrays, 'opt_state': optax state, 'step': int32,
   'nonfinite_run': int32 (consecutive skipped updates), 'nonfinite_total': int32}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from data_pipelines import features as F
from x2vlm_jax import losses
from x2vlm_jax.models.fusion import VisionKV
from x2vlm_jax.models.x2vlm import X2VLM


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the step computes. Defaults = official pre-training (§4.6, §6.4)."""

  iter_perc: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {F.IMAGE: 1.0, F.REGION: 1.0, F.VIDEO: 1.0})
  # Hard negatives are drawn per data shard as the official code draws per GPU. 0 = one shard
  # per device slice of the batch axis of the mesh; k > 0 = k contiguous shards whatever the
  # mesh (k = 1 draws from the whole batch; tests use it to compare meshes).
  neg_shards: int = 0
  # The official all-gather makes the encoders see 1/W of the global ITC gradient (§4.1, §9.11).
  # 0 = ordinary autodiff (default); W > 0 reproduces the official scaling for world size W.
  itc_grad_world_size: int = 0
  deterministic: bool = False  # no dropout / drop path (tests, evaluation of the loss)
  naive: bool = False  # recompute cross-attention K/V for every fusion pass (test reference)


def clamp_temp(params: dict, cfg) -> dict:
  """The official step clamps `temp` in place to [0.001, 0.5] before computing the loss."""
  return {**params, "temp": jnp.clip(params["temp"], cfg.temp_min, cfg.temp_max)}


def _split_keys(key, n):
  return [None] * n if key is None else list(jax.random.split(key, n))


def _negatives(key, v, t, temp, valid, cfg: StepConfig, mesh: Mesh | None):
  """Hard-negative indices, per data shard (§4.2)."""
  if cfg.neg_shards == 0 and mesh is not None:
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    if shards > 1:
      return losses.sample_hard_negatives_sharded(mesh, key, v, t, temp, valid)
  return losses.sample_hard_negatives(key, v, t, temp, valid, num_shards=max(cfg.neg_shards, 1))


def _gather_kv(kv: VisionKV, rows) -> VisionKV:
  return VisionKV(jnp.take(kv.key, rows, axis=1), jnp.take(kv.value, rows, axis=1))


def _concat_kv(*kvs: VisionKV, axis: int = 1) -> VisionKV:
  return VisionKV(jnp.concatenate([k.key for k in kvs], axis),
                  jnp.concatenate([k.value for k in kvs], axis))


def kind_terms(model: X2VLM, kind: str, b: Mapping[str, jax.Array], temp, key,
               cfg: StepConfig, mesh: Mesh | None, itm: bool = True) -> dict[str, jax.Array]:
  """Loss terms of one kind's sub-batch: itc, itm, mlm (+ box_l1, box_giou for regions)."""
  k_vis, k_txt, k_neg, k_fuse = _split_keys(None if cfg.deterministic else key, 4)
  if cfg.deterministic:
    k_neg = key  # negatives are sampled even without dropout
  valid = b[F.VALID]
  ids, mask = b[F.TEXT_IDS], b[F.TEXT_MASK]
  nb = ids.shape[0]

  # Vision: every image / frame through the tower exactly once.
  if kind == F.VIDEO:
    image_tokens = model.encode_video(b[F.FRAMES], b[F.FRAME_VALID], k_vis)  # [B, S, Dv]
  else:
    image_tokens = model.encode_image(b[F.PIXELS], k_vis)  # [N, S, Dv]
  s = image_tokens.shape[1]
  if kind == F.REGION:
    vision, vmask = model.concepts(image_tokens, b[F.PATCH_MASK], b[F.IMAGE_INDEX])  # [B, S, Dv]
  else:
    vision, vmask = image_tokens, jnp.ones((nb, s), jnp.int32)

  # Text: the unmasked and the MLM-masked captions in one tower call.
  both = model.encode_text(jnp.concatenate([ids, b[F.MLM_IDS]]), jnp.concatenate([mask, mask]),
                           k_txt)
  text, text_mlm = both[:nb], both[nb:]  # [B, L, Dt] each

  v_feat, t_feat = model.itc_features(vision, text)
  grad_scale = 1.0 / cfg.itc_grad_world_size if cfg.itc_grad_world_size else None
  terms = {"itc": losses.itc_loss(v_feat, t_feat, temp, valid, grad_scale=grad_scale)}

  arange = jnp.arange(nb)
  if itm:
    neg_img, neg_txt = _negatives(k_neg, v_feat, t_feat, temp, valid, cfg, mesh)
  else:
    neg_img = neg_txt = arange

  # Fusion passes: rows of (text, text mask, vision row, vision mask).
  texts = [text, text, text[neg_txt], text_mlm] if itm else [text_mlm]
  tmasks = [mask, mask, mask[neg_txt], mask] if itm else [mask]
  vrows = [arange, neg_img, arange, arange] if itm else [arange]
  vmasks = [vmask, vmask[neg_img], vmask, vmask] if itm else [vmask]
  if kind == F.REGION:  # box pass: the full image with an all-ones mask (§2 step 5)
    texts.append(text)
    tmasks.append(mask)
    vrows.append(nb + b[F.IMAGE_INDEX])
    vmasks.append(jnp.ones((nb, s), jnp.int32))

  if cfg.naive:
    table = jnp.concatenate([vision, image_tokens]) if kind == F.REGION else vision
    keys = _split_keys(k_fuse, len(texts))
    fused = [model.fuse(t, m, jnp.take(table, r, axis=0), vm, key=k)
             for t, m, r, vm, k in zip(texts, tmasks, vrows, vmasks, keys)]
  else:
    kv = model.vision_kv(vision if kind != F.REGION else image_tokens)  # [layers, N, S, H, dh]
    if kind == F.REGION:
      # A concept differs from its image only in token 0: reuse the image's patch K/V and add
      # the K/V of the concept token. Rows [0, B) = concepts, [B, B+N) = the full images.
      tok0 = model.vision_kv(vision[:, :1])  # [layers, B, 1, H, dh]
      full = _gather_kv(kv, b[F.IMAGE_INDEX])  # [layers, B, S, H, dh]
      concept = VisionKV(jnp.concatenate([tok0.key, full.key[:, :, 1:]], 2),
                         jnp.concatenate([tok0.value, full.value[:, :, 1:]], 2))
      kv = _concat_kv(concept, kv)
    out = model.fuse(jnp.concatenate(texts), jnp.concatenate(tmasks), kv,
                     jnp.concatenate(vmasks), kv_index=jnp.concatenate(vrows), key=k_fuse)
    fused = jnp.split(out, len(texts))

  if itm:
    logits = [model.itm_logits(f) for f in fused[:3]]
    terms["itm"] = losses.itm_loss(*logits, valid=valid, neg_image_valid=neg_img != arange,
                                   neg_text_valid=neg_txt != arange)
    fused_mlm = fused[3]
  else:
    fused_mlm = fused[0]
  mlm_w = b[F.MLM_WEIGHTS] * valid[:, None].astype(jnp.float32)
  terms["mlm"], _ = losses.mlm_loss(model.mlm_logits(fused_mlm, b[F.MLM_POSITIONS]),
                                    b[F.MLM_LABELS], mlm_w)
  if kind == F.REGION:
    terms["box_l1"], terms["box_giou"] = losses.box_loss(model.box(fused[-1]), b[F.BOX],
                                                         b[F.IS_IMAGE], valid)
  return terms


def loss_fn(model: X2VLM, batch: Mapping[str, Mapping[str, jax.Array]], key, cfg: StepConfig,
            mesh: Mesh | None = None, itm: bool = True):
  """Total loss and flat metrics of one MixedBatch (kinds present in the batch only)."""
  temp = model.temp[...]  # already clamped by the step (see clamp_temp)
  terms = {}
  for i, kind in enumerate(k for k in F.KINDS if k in batch):
    k = None if key is None else jax.random.fold_in(key, i)
    terms[kind] = kind_terms(model, kind, batch[kind], temp, k, cfg, mesh, itm)
  total, metrics = losses.combine(terms, cfg.iter_perc)
  metrics["temperature"] = temp
  return total, metrics


def device_batch(batch: Mapping[str, Mapping[str, Any]]) -> dict:
  """Drops the host-only bookkeeping fields (record ids) from a MixedBatch."""
  return {kind: {k: v for k, v in fields.items() if k not in F.HOST_ONLY_FIELDS}
          for kind, fields in batch.items()}


def init_state(params: dict, tx: optax.GradientTransformation) -> dict:
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "nonfinite_run": jnp.zeros((), jnp.int32), "nonfinite_total": jnp.zeros((), jnp.int32)}


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(graphdef, abstract_state, tx: optax.GradientTransformation,
                    cfg: StepConfig, mesh: Mesh | None = None, model_cfg=None,
                    accum_steps: int = 1, grad_hook=None):
  """Returns step(state, batch, key, itm=True) -> (state, metrics), not yet jitted.

  `graphdef`/`abstract_state` come from `nnx.split(abstract_model(cfg), nnx.Param)`.
  With accum_steps = A > 1 every batch leaf carries a leading [A] axis of micro-batches and the
  gradients are averaged over them (gradient accumulation; each micro-batch draws its ITC and
  ITM negatives from itself only, so A micro-batches of B are not one batch of A*B). An update whose loss or gradients are not finite is skipped: parameters
  and optimizer state stay bit-unchanged and `nonfinite_run` counts consecutive skips.
  `grad_hook(grads, step)` (tests only) may transform the gradients, e.g. to inject a NaN.
  """

  def model_from(params):
    st = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(graphdef, st)

  def loss_of(params, batch, key, itm):
    model = model_from(params)
    return loss_fn(model, batch, key, cfg, mesh, itm)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def step(state, batch, key, itm: bool = True):
    params = state["params"]
    if model_cfg is not None:
      params = clamp_temp(params, model_cfg)
    if accum_steps > 1:
      def body(carry, xs):
        i, sub = xs
        (l, m), g = grad_fn(params, sub, jax.random.fold_in(key, i), itm)
        return jax.tree.map(jnp.add, carry, (l, m, g)), None

      shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], batch), key, itm)
      zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                          (shapes[0][0], shapes[0][1], shapes[1]))
      (loss, metrics, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), batch))
      loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))
    else:
      (loss, metrics), grads = grad_fn(params, batch, key, itm)
    if grad_hook is not None:
      grads = grad_hook(grads, state["step"])
    finite = jnp.isfinite(loss) & _all_finite(grads)
    updates, new_opt = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "params": keep(new_params, state["params"]),
        "opt_state": keep(new_opt, state["opt_state"]),
        "step": state["step"] + 1,
        "nonfinite_run": jnp.where(finite, 0, state["nonfinite_run"] + 1),
        "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
    }
    metrics = dict(metrics)
    metrics["l2_grads"] = optax.global_norm(grads)
    metrics["l2_params"] = optax.global_norm(params)
    metrics["update_skipped"] = (~finite).astype(jnp.float32)
    return new_state, metrics

  return step
