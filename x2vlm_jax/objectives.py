"""The pre-training loss of one mixed batch: ITC, ITM, MLM and box terms over image, region/object
and video examples, each tower called ONCE for all kinds.

One step (docs/train_step.md), written so that the traced program holds each tower once whatever
the number of kinds (compile time is dominated by the number of distinct kernels):

  1. vision: the images of the image kind, the image slots of the region kind and every frame of
     the video kind go through ONE vision-tower call (`shard_concat` keeps rows on their device);
     region concepts are pooled from their image's patch tokens, video frames are averaged with
     the frame embedding (docs/fidelity.md#region-concepts, docs/fidelity.md#video-frame-embedding);
  2. text: the unmasked and the MLM-masked captions of every kind in ONE text-tower call;
  3. per kind: ITC on the kind's (global) batch and hard negatives per data shard
     (docs/fidelity.md#itm-hard-negatives);
  4. fusion: every pass of every kind (ITM positives, both hard negatives, MLM, and for regions
     the box pass on the full image) in ONE fusion call whose cross-attention keys/values were
     computed once per vision sequence (`X2VLM.vision_kv`). A concept differs from its image
     only in token 0, so its K/V are the image's patch K/V plus the K/V of the concept token;
  5. heads once over the rows of all kinds, losses per kind, weighted by `iter_perc`.

The official code runs each kind separately and recomputes K/V for every pass; the result is the
same (tests/test_train_step_equiv.py compares with a reference written that way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from data_pipelines import features as F
from x2vlm_jax import losses, sharding
from x2vlm_jax import shard_concat as sc
from x2vlm_jax.models.fusion import VisionKV
from x2vlm_jax.models.x2vlm import X2VLM


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the pre-training loss computes. Defaults = the official pre-training step."""

  iter_perc: Mapping[str, float] = dataclasses.field(
    default_factory=lambda: {F.IMAGE: 1.0, F.REGION: 1.0, F.VIDEO: 1.0}
  )
  # Loss term -> weight in every kind (losses.TERMS); missing = 1.0, the official weights.
  term_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
  # Hard negatives are drawn per data shard as the official code draws per GPU. 0 = one shard
  # per device slice of the batch axis of the mesh; k > 0 = k contiguous shards whatever the
  # mesh (k = 1 draws from the whole batch; tests use it to compare meshes).
  neg_shards: int = 0
  # The official all-gather makes the encoders see 1/W of the global ITC gradient
  # (docs/fidelity.md#itc-gradient-scaling). 0 = ordinary autodiff (default); W > 0
  # reproduces the official scaling for world size W.
  itc_grad_world_size: int = 0
  deterministic: bool = False  # no dropout / drop path (e.g. to evaluate the loss)
  # The objectives computed (a task picks them; pre-training computes all four). 'box' applies
  # to the region kind; an objective left out costs nothing (its passes are not traced).
  objectives: tuple[str, ...] = ("itc", "itm", "mlm", "box")
  # Retrieval fine-tuning: rows with equal `image_id` are positives of each other in ITC (soft
  # targets) and never each other's ITM negatives (docs/fidelity.md#duplicates-are-negatives).
  image_ids: bool = False
  # Captioning (tasks_caption.py): the official label smoothing of the masked-token loss.
  label_smoothing: float = 0.1
  # MVPTR tasks (tasks_mvptr_pretrain.py): the `loss.mvptr` section (variants, weights).
  mvptr: Mapping[str, Any] | None = None


class KindKeys(NamedTuple):
  """PRNG keys of one kind (None where the step is deterministic)."""

  vision: jax.Array | None
  text: jax.Array | None
  negatives: jax.Array | None
  fusion: jax.Array | None


def kind_keys(key, cfg: StepConfig) -> KindKeys:
  """The keys of one kind from its folded key; negatives are sampled even without dropout."""
  if key is None:
    return KindKeys(None, None, None, None)
  if cfg.deterministic:
    return KindKeys(None, None, key, None)
  return KindKeys(*jax.random.split(key, 4))


def negatives(key, v, t, temp, valid, cfg: StepConfig, mesh: Mesh | None, ids=None):
  """(negative image, negative text) row per row, drawn per data shard; rows sharing an id
  (`ids`, optional) are never drawn as each other's negatives."""
  if cfg.neg_shards == 0 and sharding.batch_shards(mesh) > 1:
    return losses.sample_hard_negatives_sharded(mesh, key, v, t, temp, valid, ids=ids)
  return losses.sample_hard_negatives(
    key, v, t, temp, valid, ids=ids, num_shards=max(cfg.neg_shards, 1)
  )


def fused_terms(kind: str, b, itm_logits, mlm_logits, box, neg, itm: bool) -> dict:
  """ITM / MLM / box terms of one kind from its head outputs (the order `combine` sums in).

  itm_logits: [positive, negative image, negative text] logits [B, 2] each (itm only);
  mlm_logits [B, M, V] (None: no MLM); box [B, 4] (regions with the box objective, else None);
  neg: the negative rows of each pair.
  """
  valid = b[F.VALID]
  terms = {}
  if itm:
    arange = jnp.arange(valid.shape[0])
    terms["itm"] = losses.itm_loss(
      *itm_logits, valid=valid, neg_image_valid=neg[0] != arange, neg_text_valid=neg[1] != arange
    )
  if mlm_logits is not None:
    mlm_w = b[F.MLM_WEIGHTS] * valid[:, None].astype(jnp.float32)
    terms["mlm"], _ = losses.mlm_loss(mlm_logits, b[F.MLM_LABELS], mlm_w)
  if kind == F.REGION and box is not None:
    terms["box_l1"], terms["box_giou"] = losses.box_loss(box, b[F.BOX], b[F.IS_IMAGE], valid)
  return terms


def check_inputs(batch, kinds, model: X2VLM) -> None:
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
      raise ValueError(
        f"batch[{kind!r}][{field!r}] must be uint8 {want} with R = {r}, got "
        f"{x.dtype} {tuple(x.shape)}"
      )
    for name in (F.TEXT_IDS, F.TEXT_MASK, F.MLM_IDS):
      if name not in b:
        raise ValueError(f"batch[{kind!r}] has no {name!r} field")
      if b[name].ndim != 2 or b[name].shape != b[F.TEXT_IDS].shape:
        raise ValueError(
          f"batch[{kind!r}][{name!r}] must be [B, L] like text_ids "
          f"{tuple(b[F.TEXT_IDS].shape)}, got {tuple(b[name].shape)}"
        )
    lengths[kind] = b[F.TEXT_IDS].shape[1]
  if len(set(lengths.values())) > 1:
    raise ValueError(f"all kinds must share the text length L (one text-tower call), got {lengths}")


# ----------------------------------------------------------------------------------------------
# The pieces of `merged_terms`, in the order they run.


class Vision(NamedTuple):
  """Vision side of the step, per kind (dicts keyed by kind)."""

  sequences: list  # per kind in `kinds` order: the full vision sequences [N_k, S, Dv]
  tokens: dict  # what each kind's texts attend to: images, concepts or pooled frames [B, S, Dv]
  mask: dict  # [B, S] vision mask of `tokens`


def _encode_vision(model: X2VLM, batch, kinds, nbs, key, mesh) -> Vision:
  """Every image / frame of every kind in one tower call, then concepts and frame pooling."""
  pix = [
    batch[k][F.FRAMES].reshape((-1,) + batch[k][F.FRAMES].shape[2:])
    if k == F.VIDEO
    else batch[k][F.PIXELS]
    for k in kinds
  ]
  sizes = [p.shape[0] for p in pix]
  sh = sc.num_shards(mesh, sizes)
  towers = sc.split(model.encode_image(sc.cat(pix, sh), key), sizes, sh)  # [N_k, S, Dv]
  sequences, tokens, mask = [], {}, {}
  for kind, tok in zip(kinds, towers):
    b = batch[kind]
    if kind == F.VIDEO:
      tok = model.pool_frames(tok.reshape((nbs[kind], -1) + tok.shape[1:]), b[F.FRAME_VALID])
    sequences.append(tok)
    if kind == F.REGION:
      tokens[kind], mask[kind] = model.concepts(tok, b[F.PATCH_MASK], b[F.IMAGE_INDEX])
    else:
      tokens[kind], mask[kind] = tok, jnp.ones((nbs[kind], tok.shape[1]), jnp.int32)
  return Vision(sequences, tokens, mask)


def _encode_texts(model: X2VLM, batch, kinds, key, mesh, mlm: bool) -> tuple[dict, dict]:
  """(unmasked, MLM-masked) text states per kind, [B, L, Dt], from one text-tower call (the
  masked ones only with the MLM objective; else the second dict is empty)."""
  masked = [batch[k][F.MLM_IDS] for k in kinds] if mlm else []
  ids = [batch[k][F.TEXT_IDS] for k in kinds] + masked
  masks = [batch[k][F.TEXT_MASK] for k in kinds] * (2 if mlm else 1)
  sizes = [x.shape[0] for x in ids]
  sh = sc.num_shards(mesh, sizes)
  texts = sc.split(model.encode_text(sc.cat(ids, sh), sc.cat(masks, sh), key), sizes, sh)
  return dict(zip(kinds, texts[: len(kinds)])), dict(zip(kinds, texts[len(kinds) :]))


@dataclasses.dataclass(frozen=True)
class KVTable:
  """Cross-attention K/V of every vision sequence of the step, and where each kind's rows are.

  Rows: the full sequences of every kind (`sizes`, shard-concatenated), then, when the batch
  has regions, one concept row per region text (`concepts`), shard-concatenated after them.
  """

  kv: VisionKV  # [layers, rows, S, H, dh] each
  sizes: tuple[int, ...]  # full sequences per kind
  concepts: int  # concept rows (0 = no region kind)
  shards: int

  def full_rows(self, piece: int, rows: jax.Array) -> jax.Array:
    """Rows of kind number `piece`'s full sequences (e.g. a region text's whole image)."""
    rows = sc.index(rows, piece, self.sizes, self.shards)
    if self.concepts:
      rows = sc.index(rows, 0, [sum(self.sizes), self.concepts], self.shards)
    return rows

  def concept_rows(self, rows: jax.Array) -> jax.Array:
    """Rows of the region texts' concepts."""
    return sc.index(rows, 1, [sum(self.sizes), self.concepts], self.shards)


def _kv_table(model: X2VLM, batch, kinds, vision: Vision, mesh) -> KVTable:
  """K/V once per vision sequence; concepts reuse their image's patch K/V."""
  sizes = tuple(t.shape[0] for t in vision.sequences)
  concepts = batch[F.REGION][F.TEXT_IDS].shape[0] if F.REGION in kinds else 0
  sh = sc.num_shards(mesh, list(sizes) + ([concepts] if concepts else []))
  kv = model.vision_kv(sc.cat(vision.sequences, sh))  # [layers, sum N_k, S, H, dh]
  if concepts:
    tok0 = model.vision_kv(vision.tokens[F.REGION][:, :1])  # [layers, Br, 1, H, dh]
    image_rows = sc.index(batch[F.REGION][F.IMAGE_INDEX], kinds.index(F.REGION), sizes, sh)
    image_kv = VisionKV(
      jnp.take(kv.key, image_rows, axis=1), jnp.take(kv.value, image_rows, axis=1)
    )
    concept = VisionKV(
      jnp.concatenate([tok0.key, image_kv.key[:, :, 1:]], 2),
      jnp.concatenate([tok0.value, image_kv.value[:, :, 1:]], 2),
    )
    kv = VisionKV(
      sc.cat([kv.key, concept.key], sh, axis=1), sc.cat([kv.value, concept.value], sh, axis=1)
    )
  return KVTable(kv, sizes, concepts, sh)


class FusionPass(NamedTuple):
  """One block of rows of the fusion call."""

  head: str  # which head reads the fused rows: 'itm' | 'mlm' | 'box'
  kind: str
  text: jax.Array  # [B, L, Dt]
  text_mask: jax.Array  # [B, L]
  kv_rows: jax.Array  # [B] row of the K/V table each text attends to
  vision_mask: jax.Array  # [B, S]


def _fusion_passes(
  batch, kinds, text, text_mlm, vision: Vision, table: KVTable, neg, use: frozenset
) -> list[FusionPass]:
  """The passes of every kind: ITM (positive, negative image, negative text), MLM, box; only
  those of the objectives in `use`."""
  passes = []
  for i, kind in enumerate(kinds):
    m, t, vm = batch[kind][F.TEXT_MASK], text[kind], vision.mask[kind]
    arange = jnp.arange(t.shape[0])
    rows = table.concept_rows(arange) if kind == F.REGION else table.full_rows(i, arange)
    if "itm" in use:
      neg_img, neg_txt = neg[kind]
      passes += [
        FusionPass("itm", kind, t, m, rows, vm),
        FusionPass("itm", kind, t, m, rows[neg_img], vm[neg_img]),
        FusionPass("itm", kind, t[neg_txt], m[neg_txt], rows, vm),
      ]
    if "mlm" in use:
      passes.append(FusionPass("mlm", kind, text_mlm[kind], m, rows, vm))
  # Box pass: the full image with an all-ones mask (docs/fidelity.md#box-pass-uses-the-full-image).
  if F.REGION in kinds and "box" in use:
    rb, i = batch[F.REGION], kinds.index(F.REGION)
    s = vision.sequences[i].shape[1]
    passes.append(
      FusionPass(
        "box",
        F.REGION,
        text[F.REGION],
        rb[F.TEXT_MASK],
        table.full_rows(i, rb[F.IMAGE_INDEX]),
        jnp.ones((rb[F.TEXT_IDS].shape[0], s), jnp.int32),
      )
    )
  return passes


def _fuse(model: X2VLM, passes: list[FusionPass], kv: VisionKV, key, mesh) -> list[jax.Array]:
  """All passes through ONE fusion call -> fused states [B, L, Dt] per pass."""
  sizes = [p.text.shape[0] for p in passes]
  sh = sc.num_shards(mesh, sizes)
  col = lambda field: sc.cat([getattr(p, field) for p in passes], sh)
  text, text_mask, vision_mask = col("text"), col("text_mask"), col("vision_mask")
  fused = model.fuse(text, text_mask, kv, vision_mask, kv_index=col("kv_rows"), key=key)
  return sc.split(fused, sizes, sh)


def _heads(model: X2VLM, batch, kinds, passes, fused, mesh) -> dict[str, list]:
  """Each head once over its passes of all kinds -> head -> [(kind, output)] in pass order."""

  def run(head, fn, *extra):
    idx = [i for i, p in enumerate(passes) if p.head == head]
    sizes = [passes[i].text.shape[0] for i in idx]
    sh = sc.num_shards(mesh, sizes)
    out = sc.split(
      fn(sc.cat([fused[i] for i in idx], sh), *[sc.cat(list(e), sh) for e in extra]), sizes, sh
    )
    return [(passes[i].kind, o) for i, o in zip(idx, out)]

  has = lambda head: any(p.head == head for p in passes)
  heads = {"itm": run("itm", model.itm_logits) if has("itm") else []}
  mlm_positions = [batch[k][F.MLM_POSITIONS] for k in kinds]
  heads["mlm"] = run("mlm", model.mlm_logits, mlm_positions) if has("mlm") else []
  heads["box"] = run("box", model.box) if has("box") else []
  return heads


def _contrastive(model, batch, kinds, vision, text, temp, per_kind, cfg, mesh, use):
  """Per kind: ITC on the kind's global batch and the ITM hard negatives (per data shard)."""
  grad_scale = 1.0 / cfg.itc_grad_world_size if cfg.itc_grad_world_size else None
  itc, neg = {}, {}
  for kind, keys in zip(kinds, per_kind):
    b = batch[kind]
    valid, ids = b[F.VALID], (b[F.IMAGE_ID] if cfg.image_ids else None)
    if not {"itc", "itm"} & use:
      continue
    v_feat, t_feat = model.itc_features(vision.tokens[kind], text[kind])
    if "itc" in use:
      itc[kind] = losses.itc_loss(v_feat, t_feat, temp, valid, ids=ids, grad_scale=grad_scale)
    if "itm" in use:
      neg[kind] = negatives(keys.negatives, v_feat, t_feat, temp, valid, cfg, mesh, ids=ids)
  return itc, neg


def merged_terms(
  model: X2VLM,
  batch: Mapping[str, Mapping[str, jax.Array]],
  key,
  cfg: StepConfig,
  mesh: Mesh | None = None,
  itm: bool = True,
):
  """Loss terms of every kind present, each tower called once (see the module docstring).

  Returns kind -> {itc, itm, mlm (+ box_l1, box_giou)}, the objectives of `cfg.objectives`
  (ITM only when `itm` too: the loop may switch it off for a step).
  """
  kinds = [k for k in F.KINDS if k in batch]
  check_inputs(batch, kinds, model)
  use = frozenset(o for o in cfg.objectives if o != "itm" or itm)
  temp = model.temp[...]
  per_kind = [
    kind_keys(None if key is None else jax.random.fold_in(key, i), cfg) for i in range(len(kinds))
  ]
  if key is None or cfg.deterministic:
    k_vis = k_txt = k_fuse = None
  else:  # dropout / drop-path keys of the shared tower calls
    k_vis, k_txt, k_fuse = jax.random.split(jax.random.fold_in(key, len(F.KINDS)), 3)
  nbs = {k: batch[k][F.TEXT_IDS].shape[0] for k in kinds}

  vision = _encode_vision(model, batch, kinds, nbs, k_vis, mesh)
  text, text_mlm = _encode_texts(model, batch, kinds, k_txt, mesh, "mlm" in use)
  itc, neg = _contrastive(model, batch, kinds, vision, text, temp, per_kind, cfg, mesh, use)
  table = _kv_table(model, batch, kinds, vision, mesh)
  passes = _fusion_passes(batch, kinds, text, text_mlm, vision, table, neg, use)
  fused = _fuse(model, passes, table.kv, k_fuse, mesh)
  heads = _heads(model, batch, kinds, passes, fused, mesh)

  terms = {}
  for kind in kinds:
    mine = {head: [o for k, o in outs if k == kind] for head, outs in heads.items()}
    terms[kind] = {"itc": itc[kind]} if kind in itc else {}
    terms[kind].update(
      fused_terms(
        kind,
        batch[kind],
        mine["itm"],
        mine["mlm"][0] if mine["mlm"] else None,
        mine["box"][0] if mine["box"] else None,
        neg.get(kind),
        "itm" in use,
      )
    )
  return terms


def loss_fn(
  model: X2VLM,
  batch: Mapping[str, Mapping[str, jax.Array]],
  key,
  cfg: StepConfig,
  mesh: Mesh | None = None,
  itm: bool = True,
):
  """Total loss and flat metrics of one MixedBatch (kinds present in the batch only)."""
  temp = model.temp[...]  # already clamped by the step (train_step.clamp_temp)
  terms = merged_terms(model, batch, key, cfg, mesh, itm)
  total, metrics = losses.combine(terms, cfg.iter_perc, cfg.term_weights)
  metrics["temperature"] = temp
  return total, metrics


def make_loss(cfg: StepConfig, mesh: Mesh | None = None):
  """`loss(model, batch, key, itm)` of `train_step.make_train_step`: the objectives of `cfg`."""

  def loss(model: X2VLM, batch, key, itm: bool = True):
    return loss_fn(model, batch, key, cfg, mesh, itm)

  return loss
