"""The pre-training step: four losses over image, region/object and video batches in one jit.

One step (reference §6.4), written so that the traced program holds each tower ONCE whatever the
number of kinds (compile time is dominated by the number of distinct kernels, docs/train_step.md):

  1. vision: the images of the image kind, the image slots of the region kind and every frame of
     the video kind go through ONE vision-tower call (`shard_concat` keeps rows on their device);
     region concepts are pooled from their image's patch tokens (§2), video frames are averaged
     with the frame embedding (§3);
  2. text: the unmasked and the MLM-masked captions of every kind in ONE text-tower call;
  3. per kind: ITC on the kind's (global) batch and hard negatives per data shard (§4.1-4.2);
  4. fusion: every pass of every kind (ITM positives, both hard negatives, MLM, and for regions
     the box pass on the full image) in ONE fusion call whose cross-attention keys/values were
     computed once per vision sequence (`X2VLM.vision_kv`). A concept differs from its image
     only in token 0, so its K/V are the image's patch K/V plus the K/V of the concept token;
  5. heads once over the rows of all kinds, losses per kind (§4.6), weighted by `iter_perc`.

The official code runs each kind separately and recomputes K/V for every pass; the result is the
same (tested against `StepConfig(naive=True)`, which follows that structure).

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
from x2vlm_jax import shard_concat as sc
from x2vlm_jax.models.fusion import VisionKV
from x2vlm_jax.models.x2vlm import X2VLM


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the step computes. Defaults = official pre-training (§4.6, §6.4)."""

  iter_perc: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {F.IMAGE: 1.0, F.REGION: 1.0, F.VIDEO: 1.0})
  # Loss term -> weight in every kind (losses.TERMS); missing = 1.0, the official weights.
  term_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
  # Hard negatives are drawn per data shard as the official code draws per GPU. 0 = one shard
  # per device slice of the batch axis of the mesh; k > 0 = k contiguous shards whatever the
  # mesh (k = 1 draws from the whole batch; tests use it to compare meshes).
  neg_shards: int = 0
  # The official all-gather makes the encoders see 1/W of the global ITC gradient (§4.1, §9.11).
  # 0 = ordinary autodiff (default); W > 0 reproduces the official scaling for world size W.
  itc_grad_world_size: int = 0
  deterministic: bool = False  # no dropout / drop path (tests, evaluation of the loss)
  # Test reference only: the official structure, i.e. every kind on its own (own tower calls)
  # and one fusion call per pass that recomputes the cross-attention K/V.
  naive: bool = False


def clamp_temp(params: dict, cfg) -> dict:
  """The official step clamps `temp` in place to [0.001, 0.5] before computing the loss."""
  return {**params, "temp": jnp.clip(params["temp"], cfg.temp_min, cfg.temp_max)}


def _kind_keys(key, cfg: StepConfig):
  """(vision, text, negatives, fusion) keys of one kind from its folded key."""
  if key is None:
    return None, None, None, None
  if cfg.deterministic:
    return None, None, key, None  # negatives are sampled even without dropout
  return tuple(jax.random.split(key, 4))


def _negatives(key, v, t, temp, valid, cfg: StepConfig, mesh: Mesh | None):
  """Hard-negative indices, per data shard (§4.2)."""
  if cfg.neg_shards == 0 and mesh is not None:
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    if shards > 1:
      return losses.sample_hard_negatives_sharded(mesh, key, v, t, temp, valid)
  return losses.sample_hard_negatives(key, v, t, temp, valid, num_shards=max(cfg.neg_shards, 1))


def _gather_kv(kv: VisionKV, rows) -> VisionKV:
  return VisionKV(jnp.take(kv.key, rows, axis=1), jnp.take(kv.value, rows, axis=1))


def _concept_kv(tok0: VisionKV, image_kv: VisionKV) -> VisionKV:
  """Concept K/V = [K/V of the concept token 0, the image's patch K/V] ([layers, B, S, H, dh])."""
  return VisionKV(jnp.concatenate([tok0.key, image_kv.key[:, :, 1:]], 2),
                  jnp.concatenate([tok0.value, image_kv.value[:, :, 1:]], 2))


def _itm_mlm_box(kind, b, fused_itm, fused_mlm, fused_box, neg, itm):
  """ITM / MLM / box terms of one kind from its fused rows (the order `combine` sums in)."""
  valid = b[F.VALID]
  terms = {}
  if itm:
    arange = jnp.arange(valid.shape[0])
    terms["itm"] = losses.itm_loss(*fused_itm, valid=valid, neg_image_valid=neg[0] != arange,
                                   neg_text_valid=neg[1] != arange)
  mlm_w = b[F.MLM_WEIGHTS] * valid[:, None].astype(jnp.float32)
  terms["mlm"], _ = losses.mlm_loss(fused_mlm, b[F.MLM_LABELS], mlm_w)
  if kind == F.REGION:
    terms["box_l1"], terms["box_giou"] = losses.box_loss(fused_box, b[F.BOX], b[F.IS_IMAGE],
                                                         valid)
  return terms


def kind_terms(model: X2VLM, kind: str, b: Mapping[str, jax.Array], temp, key,
               cfg: StepConfig, mesh: Mesh | None, itm: bool = True) -> dict[str, jax.Array]:
  """Loss terms of ONE kind computed the official way (the `naive` reference of the tests).

  Own vision- and text-tower calls, and every fusion pass with its own vision tokens, so the
  cross-attention K/V are recomputed for every row of every pass as the official code does
  (§6.4); the passes share one fusion call only to keep the reference quick to compile.
  Returns itc, itm, mlm (+ box_l1, box_giou).
  """
  k_vis, k_txt, k_neg, k_fuse = _kind_keys(key, cfg)
  valid = b[F.VALID]
  ids, mask = b[F.TEXT_IDS], b[F.TEXT_MASK]
  nb = ids.shape[0]

  if kind == F.VIDEO:
    image_tokens = model.encode_video(b[F.FRAMES], b[F.FRAME_VALID], k_vis)  # [B, S, Dv]
  else:
    image_tokens = model.encode_image(b[F.PIXELS], k_vis)  # [N, S, Dv]
  s = image_tokens.shape[1]
  if kind == F.REGION:
    vision, vmask = model.concepts(image_tokens, b[F.PATCH_MASK], b[F.IMAGE_INDEX])  # [B, S, Dv]
  else:
    vision, vmask = image_tokens, jnp.ones((nb, s), jnp.int32)

  both = model.encode_text(jnp.concatenate([ids, b[F.MLM_IDS]]), jnp.concatenate([mask, mask]),
                           k_txt)
  text, text_mlm = both[:nb], both[nb:]  # [B, L, Dt] each

  v_feat, t_feat = model.itc_features(vision, text)
  grad_scale = 1.0 / cfg.itc_grad_world_size if cfg.itc_grad_world_size else None
  terms = {"itc": losses.itc_loss(v_feat, t_feat, temp, valid, grad_scale=grad_scale)}

  arange = jnp.arange(nb)
  neg = _negatives(k_neg, v_feat, t_feat, temp, valid, cfg, mesh) if itm else (arange, arange)
  neg_img, neg_txt = neg
  # Fusion passes: rows of (text, text mask, vision tokens, vision mask).
  passes = [(text, mask, vision, vmask), (text, mask, vision[neg_img], vmask[neg_img]),
            (text[neg_txt], mask[neg_txt], vision, vmask)] if itm else []
  passes.append((text_mlm, mask, vision, vmask))
  if kind == F.REGION:  # box pass: the full image with an all-ones mask (§2 step 5)
    passes.append((text, mask, jnp.take(image_tokens, b[F.IMAGE_INDEX], axis=0),
                   jnp.ones((nb, s), jnp.int32)))
  fused = jnp.split(model.fuse(*[jnp.concatenate(c) for c in zip(*passes)], key=k_fuse),
                    len(passes))

  fused_itm = [model.itm_logits(f) for f in fused[:3]] if itm else None
  fused_mlm = model.mlm_logits(fused[3 if itm else 0], b[F.MLM_POSITIONS])
  fused_box = model.box(fused[-1]) if kind == F.REGION else None
  terms.update(_itm_mlm_box(kind, b, fused_itm, fused_mlm, fused_box, neg, itm))
  return terms


def _check_inputs(batch, kinds, model: X2VLM) -> None:
  """Fails at trace time, naming kind and field, on inputs the shared tower calls cannot take."""
  r = model.cfg.vision.image_size
  lengths = {}
  for kind in kinds:
    b = batch[kind]
    field = F.FRAMES if kind == F.VIDEO else F.PIXELS
    if field not in b:
      raise ValueError(f"batch[{kind!r}] has no {field!r} field")
    x = b[field]
    lead = 2 if kind == F.VIDEO else 1
    if x.dtype != jnp.uint8 or x.ndim != lead + 3 or tuple(x.shape[lead:]) != (r, r, 3):
      want = "[B, F, R, R, 3]" if kind == F.VIDEO else "[N, R, R, 3]"
      raise ValueError(f"batch[{kind!r}][{field!r}] must be uint8 {want} with R = {r}, got "
                       f"{x.dtype} {tuple(x.shape)}")
    for name in (F.TEXT_IDS, F.TEXT_MASK, F.MLM_IDS):
      if name not in b:
        raise ValueError(f"batch[{kind!r}] has no {name!r} field")
      if b[name].ndim != 2 or b[name].shape != b[F.TEXT_IDS].shape:
        raise ValueError(f"batch[{kind!r}][{name!r}] must be [B, L] like text_ids "
                         f"{tuple(b[F.TEXT_IDS].shape)}, got {tuple(b[name].shape)}")
    lengths[kind] = b[F.TEXT_IDS].shape[1]
  if len(set(lengths.values())) > 1:
    raise ValueError(f"all kinds must share the text length L (one text-tower call), got "
                     f"{lengths}")


def merged_terms(model: X2VLM, batch: Mapping[str, Mapping[str, jax.Array]], key,
                 cfg: StepConfig, mesh: Mesh | None = None, itm: bool = True):
  """Loss terms of every kind present, each tower called once (see the module docstring).

  Returns kind -> {itc, itm, mlm (+ box_l1, box_giou)}, the same terms as `kind_terms`.
  """
  kinds = [k for k in F.KINDS if k in batch]
  _check_inputs(batch, kinds, model)
  temp = model.temp[...]
  per_kind = [_kind_keys(None if key is None else jax.random.fold_in(key, i), cfg)
              for i in range(len(kinds))]
  if key is None or cfg.deterministic:
    k_vis = k_txt = k_fuse = None
  else:  # dropout / drop-path keys of the shared tower calls
    k_vis, k_txt, k_fuse = jax.random.split(jax.random.fold_in(key, len(F.KINDS)), 3)
  nbs = {k: batch[k][F.TEXT_IDS].shape[0] for k in kinds}

  # 1. Vision: every image / frame of every kind in one tower call.
  pix = [batch[k][F.FRAMES].reshape((-1,) + batch[k][F.FRAMES].shape[2:]) if k == F.VIDEO
         else batch[k][F.PIXELS] for k in kinds]
  sizes = [p.shape[0] for p in pix]
  sh = sc.num_shards(mesh, sizes)
  towers = sc.split(model.encode_image(sc.cat(pix, sh), k_vis), sizes, sh)  # [N_k, S, Dv]
  table, vision, vmask = [], {}, {}  # table: the vision rows each kind's fusion attends to
  for kind, tok in zip(kinds, towers):
    b = batch[kind]
    if kind == F.VIDEO:
      tok = model.pool_frames(tok.reshape((nbs[kind], -1) + tok.shape[1:]), b[F.FRAME_VALID])
    table.append(tok)
    if kind == F.REGION:
      vision[kind], vmask[kind] = model.concepts(tok, b[F.PATCH_MASK], b[F.IMAGE_INDEX])
    else:
      vision[kind], vmask[kind] = tok, jnp.ones((nbs[kind], tok.shape[1]), jnp.int32)

  # 2. Text: unmasked and MLM-masked captions of every kind in one tower call.
  ids = [batch[k][F.TEXT_IDS] for k in kinds] + [batch[k][F.MLM_IDS] for k in kinds]
  masks = [batch[k][F.TEXT_MASK] for k in kinds] * 2
  tsizes = [x.shape[0] for x in ids]
  tsh = sc.num_shards(mesh, tsizes)
  texts = sc.split(model.encode_text(sc.cat(ids, tsh), sc.cat(masks, tsh), k_txt), tsizes, tsh)
  text, text_mlm = dict(zip(kinds, texts[:len(kinds)])), dict(zip(kinds, texts[len(kinds):]))

  # 3. ITC per kind on its global batch; hard negatives per data shard.
  grad_scale = 1.0 / cfg.itc_grad_world_size if cfg.itc_grad_world_size else None
  itc, neg = {}, {}
  for kind, keys in zip(kinds, per_kind):
    valid = batch[kind][F.VALID]
    v_feat, t_feat = model.itc_features(vision[kind], text[kind])
    itc[kind] = losses.itc_loss(v_feat, t_feat, temp, valid, grad_scale=grad_scale)
    arange = jnp.arange(nbs[kind])
    neg[kind] = (_negatives(keys[2], v_feat, t_feat, temp, valid, cfg, mesh) if itm
                 else (arange, arange))

  # 4. Cross-attention K/V once per vision sequence, then all fusion passes in one call.
  vsizes = [t.shape[0] for t in table]
  n_concepts = [nbs[F.REGION]] if F.REGION in kinds else []
  vsh = sc.num_shards(mesh, vsizes + n_concepts)
  kv = model.vision_kv(sc.cat(table, vsh))  # [layers, sum N_k, S, H, dh]
  row = {k: (lambda r, i=i: sc.index(r, i, vsizes, vsh)) for i, k in enumerate(kinds)}
  if F.REGION in kinds:
    rb = batch[F.REGION]
    tok0 = model.vision_kv(vision[F.REGION][:, :1])  # [layers, Br, 1, H, dh]
    concept = _concept_kv(tok0, _gather_kv(kv, row[F.REGION](rb[F.IMAGE_INDEX])))
    outer = [sum(vsizes), nbs[F.REGION]]
    kv = VisionKV(sc.cat([kv.key, concept.key], vsh, axis=1),
                  sc.cat([kv.value, concept.value], vsh, axis=1))
    full_row = {k: (lambda r, f=f: sc.index(f(r), 0, outer, vsh)) for k, f in row.items()}
    vis_row = dict(full_row, **{F.REGION: lambda r: sc.index(r, 1, outer, vsh)})
  else:
    full_row = vis_row = row

  pieces = []  # (group, kind, text [B, L, Dt], text mask [B, L], kv row [B], vision mask [B, S])
  for kind in kinds:
    m, t, vm = batch[kind][F.TEXT_MASK], text[kind], vmask[kind]
    rows = vis_row[kind](jnp.arange(nbs[kind]))
    neg_img, neg_txt = neg[kind]
    if itm:
      pieces += [("itm", kind, t, m, rows, vm), ("itm", kind, t, m, rows[neg_img], vm[neg_img]),
                 ("itm", kind, t[neg_txt], m[neg_txt], rows, vm)]
    pieces.append(("mlm", kind, text_mlm[kind], m, rows, vm))
  if F.REGION in kinds:  # box pass: the full image with an all-ones mask (§2 step 5)
    rb, s = batch[F.REGION], table[kinds.index(F.REGION)].shape[1]
    pieces.append(("box", F.REGION, text[F.REGION], rb[F.TEXT_MASK],
                   full_row[F.REGION](rb[F.IMAGE_INDEX]), jnp.ones((nbs[F.REGION], s), jnp.int32)))
  fsizes = [p[2].shape[0] for p in pieces]
  fsh = sc.num_shards(mesh, fsizes)
  col = lambda j: sc.cat([p[j] for p in pieces], fsh)
  fused = sc.split(model.fuse(col(2), col(3), kv, col(5), kv_index=col(4), key=k_fuse),
                   fsizes, fsh)  # [B_k, L, Dt] per piece

  # 5. Heads once over the rows of all kinds, then the losses per kind.
  def head(group, fn, *extra):
    idx = [i for i, p in enumerate(pieces) if p[0] == group]
    hs = [fsizes[i] for i in idx]
    hsh = sc.num_shards(mesh, hs)
    out = sc.split(fn(sc.cat([fused[i] for i in idx], hsh),
                      *[sc.cat(list(e), hsh) for e in extra]), hs, hsh)
    return [(pieces[i][1], o) for i, o in zip(idx, out)]

  itm_out = head("itm", model.itm_logits) if itm else []
  mlm_out = head("mlm", model.mlm_logits, [batch[k][F.MLM_POSITIONS] for k in kinds])
  box_out = head("box", model.box) if F.REGION in kinds else []
  terms = {}
  for kind in kinds:
    terms[kind] = {"itc": itc[kind]}
    terms[kind].update(_itm_mlm_box(
        kind, batch[kind], [o for k, o in itm_out if k == kind],
        next(o for k, o in mlm_out if k == kind),
        next((o for k, o in box_out if k == kind), None), neg[kind], itm))
  return terms


def loss_fn(model: X2VLM, batch: Mapping[str, Mapping[str, jax.Array]], key, cfg: StepConfig,
            mesh: Mesh | None = None, itm: bool = True):
  """Total loss and flat metrics of one MixedBatch (kinds present in the batch only)."""
  temp = model.temp[...]  # already clamped by the step (see clamp_temp)
  if cfg.naive:
    terms = {}
    for i, kind in enumerate(k for k in F.KINDS if k in batch):
      k = None if key is None else jax.random.fold_in(key, i)
      terms[kind] = kind_terms(model, kind, batch[kind], temp, k, cfg, mesh, itm)
  else:
    terms = merged_terms(model, batch, key, cfg, mesh, itm)
  total, metrics = losses.combine(terms, cfg.iter_perc, cfg.term_weights)
  metrics["temperature"] = temp
  return total, metrics


def device_batch(batch: Mapping[str, Mapping[str, Any]]) -> dict:
  """Drops the host-only bookkeeping fields (record ids) from a MixedBatch."""
  return {kind: {k: v for k, v in fields.items() if k not in F.HOST_ONLY_FIELDS}
          for kind, fields in batch.items()}


def init_state(params: dict, tx: optax.GradientTransformation) -> dict:
  """The train state of `params` (a pure nested dict): optimizer state and zeroed counters."""
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "nonfinite_run": jnp.zeros((), jnp.int32), "nonfinite_total": jnp.zeros((), jnp.int32)}


def make_train_step(graphdef, abstract_state, tx: optax.GradientTransformation,
                    cfg: StepConfig, mesh: Mesh | None = None, model_cfg=None,
                    accum_steps: int = 1, grad_hook=None):
  """Returns step(state, batch, key, itm=True) -> (state, metrics), not yet jitted.

  `graphdef`/`abstract_state` come from `nnx.split(abstract_model(cfg), nnx.Param)`.
  With accum_steps = A > 1 every batch leaf carries a leading [A] axis of micro-batches and the
  gradients are averaged over them (gradient accumulation; each micro-batch draws its ITC and
  ITM negatives from itself only, so A micro-batches of B are not one batch of A*B).
  An update whose loss or gradient norm is not finite (a NaN/inf anywhere in the gradients makes
  the norm NaN/inf; so does a norm that overflows float32) is skipped: parameters and optimizer
  state stay bit-unchanged and `nonfinite_run` counts consecutive skips.
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

      shapes = jax.eval_shape(lambda p, b, k: grad_fn(p, b, k, itm), params,
                              jax.tree.map(lambda x: x[0], batch), key)  # itm stays static
      zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                          (shapes[0][0], shapes[0][1], shapes[1]))
      (loss, metrics, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), batch))
      loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))
    else:
      (loss, metrics), grads = grad_fn(params, batch, key, itm)
    if grad_hook is not None:
      grads = grad_hook(grads, state["step"])
    # One reduction (the norm that clipping and the metric need anyway) instead of one
    # isfinite-reduction per parameter: fewer kernels to compile, same decision.
    l2_grads = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(l2_grads)
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
    metrics["l2_grads"] = l2_grads
    metrics["l2_params"] = optax.tree.norm(params)
    metrics["update_skipped"] = (~finite).astype(jnp.float32)
    return new_state, metrics

  return step
