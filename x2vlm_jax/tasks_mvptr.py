"""MVPTR fine-tuning losses as pure functions `loss(model, batch, key) -> (loss, metrics)`
(docs/mvptr.md#fine-tuning). Facts: MVPTR_REFERENCE.md section 5 (official `run_retrieval.py`,
`run_vqa.py`, `run_ve.py`, `run_re.py` and their model classes); the model must carry the heads of
the task (`MvptrConfig.heads`). `key` None = no dropout (the deterministic forward).

Batch fields (arrays, one row per example; rows are real examples, no padding rows). Shared, as
`data_pipelines/mvptr_examples.py` builds them (the masked-label fields are not read):
  text_ids, text_mask [B, L_A]   stream A: [CLS] + word pieces + phrase ids + [SEP]
  text_type_ids [B, L_A]         optional segment ids of stream A (official VQA `--use_b_text`
                                 appends the tags to the question with segment 1)
  tag_ids, tag_mask [B, T]       stream B's tag part: [CLS] + tag word pieces + [SEP]
  regions [B, R, region_dim], region_mask [B, R]
Per task (one row of each: `data_pipelines/mvptr_finetune_examples.py`):
  retrieval  nothing more: row i's text and image are a matched pair (negatives in-batch)
  vqa        answer_scores [B, A] float: soft VQA score of every answer (0 for most)
  ve         ve_label [B] int: official mapping contradiction 0, neutral 1, entailment 2
  grounding  region_boxes [B, R, 4] corner boxes (x0, y0, x1, y1) of the regions, gt_box [B, 4]
             the ground-truth box in the same unit (IoU is unit-free per axis); paper variant
             also phrase_mask [B, L_A]: 1 on the stream-A slots of the phrase to ground

Tasks (`LOSSES`):
- retrieval: VSC (as pre-training, `mvptr_losses.vsc_loss`) + ITM with the *new* `classifier`
  Linear(D, 2) on dropout(pooler): n positives + n negatives, the hardest in-batch negatives
  (code; `itm_negatives="sample"` draws them from the VSC softmax as the paper's pre-training),
  split half hard-image / half hard-text, CE with label **1 = match** (retrieval class).
- vqa: `BertQAPredictionHead` on dropout(joint token 0), BCE-with-logits against the soft scores,
  mean over every entry x number of answers (official `instance_bce_with_logits`); head from the
  MLM head with `init_qa_head_from_mlm`.
- ve: `classifier` Linear(D, 3) on dropout(pooler), cross-entropy.
- grounding: cosine similarity of a query vector with every region state, regressed on the
  region's IoU with the ground-truth box by MSE over the real regions. variant "code"
  (`BiImageBertForRE`, `loss_mod 1`): query = joint [CLS] at `phrase_layer`, regions at the same
  layer, dropout on both. variant "paper": query = mean of the phrase's tokens of the last
  joint layer, regions of the last layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from x2vlm_jax import box_ops, losses
from x2vlm_jax import mvptr_losses as ML
from x2vlm_jax.convert.mvptr_init import init_qa_head_from_mlm  # noqa: F401  (re-exported)
from x2vlm_jax.models import layers as L
from x2vlm_jax.models.mvptr import MVPTR

STREAM_FIELDS = ("text_ids", "text_mask", "tag_ids", "tag_mask", "regions", "region_mask")
GROUNDING_VARIANTS = ("paper", "code")
ITM_NEGATIVES = ("hardest", "sample")


def _keys(key, n: int) -> list:
  """n dropout keys (all None without a key)."""
  return [None] * n if key is None else list(jax.random.split(key, n))


def _field(batch: Mapping, name: str, task: str):
  if name not in batch:
    raise KeyError(f"MVPTR {task} batch has no field {name!r} (fields: {sorted(batch)})")
  return jnp.asarray(batch[name])


def encode(model: MVPTR, b: Mapping, keys=(None, None)) -> tuple[jax.Array, jax.Array]:
  """The uni-modal stacks: (txt_encoder output [B, L_A, D], vis_encoder output [B, T + R, D])."""
  f = {n: _field(b, n, "fine-tuning") for n in STREAM_FIELDS}
  types = b.get("text_type_ids")
  text = model.encode_text(f["text_ids"], f["text_mask"], types, key=keys[0])
  vis = model.encode_vision(
    f["tag_ids"], f["tag_mask"], f["regions"], f["region_mask"], key=keys[1]
  )
  return text, vis


def joint(model: MVPTR, b: Mapping, keys=(None, None, None), *, phrase: bool = False):
  """The whole forward of matched rows -> `mvptr.Joint` (text slots first, then regions)."""
  text, vis = encode(model, b, keys[:2])
  regions = model.region_slots(vis, b["tag_ids"].shape[1])
  return model.fuse(text, b["text_mask"], regions, b["region_mask"], keys[2], phrase=phrase)


def _drop(model: MVPTR, x, key):
  return L.dropout(x, model.cfg.dropout, key)


# --------------------------------------------------------------------------------------------
# Retrieval


def negatives_key(key) -> jax.Array:
  """The key of the ITM negatives' draws (a fixed one without a dropout key, as pre-training)."""
  return jax.random.key(0) if key is None else jax.random.fold_in(key, 1)


def retrieval_pairs(key, text_feat, image_feat, logit_scale, mode: str = "hardest", shards=1):
  """(text index [N], image index [N]) of the ITM negatives: the hardest (or sampled) other
  image of each text and text of each image on stop-gradient VSC similarities, a random half of
  the rows taking the hard image and the other half the hard text (official `encode_hn`); with
  `shards` > 1 each within its device's block of the batch (`mvptr_losses.itm_pairs`)."""
  if mode not in ITM_NEGATIVES:
    raise ValueError(f"retrieval ITM negatives must be one of {ITM_NEGATIVES}, got {mode!r}")
  sim = jax.lax.stop_gradient(text_feat @ image_feat.T)
  s = jax.lax.stop_gradient(logit_scale)
  k_img, k_txt, k_split = jax.random.split(key, 3)
  hard_img = ML.pick_negatives(k_img, sim, s, mode, shards=shards)
  hard_txt = ML.pick_negatives(k_txt, sim.T, s, mode, shards=shards)
  return ML.itm_pairs(k_split, hard_img, hard_txt, shards=shards)


def retrieval_loss(
  model: MVPTR,
  batch: Mapping,
  key,
  *,
  vsc: str = "paper",
  vsc_shards: int = 1,
  itm_negatives: str = "hardest",
):
  """VSC + ITM of `BiImageBertForRetrieval` (module docstring). `vsc`/`vsc_shards` as
  `mvptr_losses.vsc_loss` (paper: global batch; code: per device -- the official fine-tuning
  runs `DataParallel`, one forward per GPU -- and then the ITM negatives per device too)."""
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  drop = _keys(key, 5)
  text, vis = encode(model, b, drop[:2])
  t, v = model.global_features(text, vis)
  scale = model.logit_scale[...]
  vsc_value = ML.vsc_loss(t, v, scale, variant=vsc, shards=vsc_shards)
  regions = model.region_slots(vis, b["tag_ids"].shape[1])
  a_mask, r_mask = b["text_mask"], b["region_mask"]
  pos = model.fuse(text, a_mask, regions, r_mask, drop[2])
  shards = vsc_shards if vsc == "code" else 1
  ti, ii = retrieval_pairs(negatives_key(key), t, v, scale, itm_negatives, shards)
  neg = model.fuse(text[ti], a_mask[ti], regions[ii], r_mask[ii], drop[3])
  n = pos.pooled.shape[0]
  logits = model.classifier_logits(_drop(model, jnp.concatenate([pos.pooled, neg.pooled]), drop[4]))
  itm = ML.itm_loss(logits[:n], logits[n:], match_class=1)
  labels = jnp.concatenate([jnp.ones((n,), jnp.int32), jnp.zeros((n,), jnp.int32)])
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  total = vsc_value + itm
  metrics = {
    "loss/mvptr_retrieval/vsc": vsc_value,
    "loss/mvptr_retrieval/itm": itm,
    "acc/mvptr_retrieval/itm": acc,
    "loss/total": total,
  }
  return total, metrics


# --------------------------------------------------------------------------------------------
# VQA


def vqa_bce(logits, scores) -> jax.Array:
  """Official `instance_bce_with_logits`: mean BCE-with-logits over [B, A] entries x A."""
  x, y = jnp.asarray(logits, jnp.float32), jnp.asarray(scores, jnp.float32)
  bce = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))  # stable form
  return jnp.mean(bce) * x.shape[1]


def vqa_loss(model: MVPTR, batch: Mapping, key):
  """BCE of the VQA head on dropout(joint token 0) vs `answer_scores`; metric: the VQA score of
  the argmax answer (official `compute_score_with_logits`)."""
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  scores = _field(b, "answer_scores", "vqa")
  drop = _keys(key, 4)
  seq = joint(model, b, drop[:3]).sequence
  logits = model.vqa_logits(_drop(model, seq[:, 0], drop[3]))
  if scores.shape != logits.shape:
    raise ValueError(f"answer_scores {scores.shape} must be [B, qa_answers] = {logits.shape}")
  loss = vqa_bce(logits, scores)
  best = jnp.argmax(logits, axis=-1)
  score = jnp.mean(jnp.take_along_axis(scores, best[:, None], axis=1))
  return loss, {"loss/mvptr_vqa": loss, "score/mvptr_vqa": score, "loss/total": loss}


# --------------------------------------------------------------------------------------------
# SNLI-VE


def ve_loss(model: MVPTR, batch: Mapping, key):
  """3-way cross-entropy of `classifier` on dropout(pooler) vs `ve_label`; accuracy metric."""
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  labels = _field(b, "ve_label", "ve").astype(jnp.int32)
  drop = _keys(key, 4)
  logits = model.classifier_logits(_drop(model, joint(model, b, drop[:3]).pooled, drop[3]))
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return loss, {"loss/mvptr_ve": loss, "acc/mvptr_ve": acc, "loss/total": loss}


# --------------------------------------------------------------------------------------------
# Phrase grounding


def region_iou(region_boxes, gt_box) -> jax.Array:
  """IoU of every region box [B, R, 4] with its row's ground-truth box [B, 4] -> [B, R]."""
  boxes = jnp.asarray(region_boxes, jnp.float32)
  gt = jnp.broadcast_to(jnp.asarray(gt_box, jnp.float32)[:, None], boxes.shape)
  return box_ops.elementwise_iou(boxes.reshape(-1, 4), gt.reshape(-1, 4)).reshape(boxes.shape[:2])


def grounding_scores(model: MVPTR, batch: Mapping, key=None, *, variant: str = "code"):
  """Cosine similarity of the grounding query with every region slot -> [B, R] float32
  (module docstring; padded regions are not masked here)."""
  if variant not in GROUNDING_VARIANTS:
    raise ValueError(f"grounding variant must be one of {GROUNDING_VARIANTS}, got {variant!r}")
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  drop = _keys(key, 4)
  out = joint(model, b, drop[:3], phrase=variant == "code")
  la = b["text_ids"].shape[1]
  if variant == "code":
    states = _drop(model, out.phrase_state, drop[3])
    query = states[:, 0]
  else:
    states = _drop(model, out.sequence, drop[3])
    w = _field(b, "phrase_mask", "grounding").astype(jnp.float32)[..., None]  # [B, L_A, 1]
    query = jnp.sum(states[:, :la] * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
  q = losses.l2_normalize(query.astype(jnp.float32))
  r = losses.l2_normalize(states[:, la:].astype(jnp.float32))
  return jnp.einsum("bd,brd->br", q, r)


def grounding_loss(model: MVPTR, batch: Mapping, key, *, variant: str = "code"):
  """MSE of `grounding_scores` onto the regions' IoU with `gt_box`, over the real regions."""
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  iou = region_iou(_field(b, "region_boxes", "grounding"), _field(b, "gt_box", "grounding"))
  sim = grounding_scores(model, b, key, variant=variant)
  w = (b["region_mask"] > 0).astype(jnp.float32)
  loss = jnp.sum(jnp.square(sim - iou) * w) / jnp.maximum(jnp.sum(w), 1.0)
  best = jnp.argmax(jnp.where(w > 0, sim, -jnp.inf), axis=-1)
  hit = jnp.take_along_axis(iou, best[:, None], axis=1)[:, 0] > 0.5
  acc = jnp.mean(hit.astype(jnp.float32))
  return loss, {"loss/mvptr_grounding": loss, "acc/mvptr_grounding": acc, "loss/total": loss}


LOSSES = {
  "retrieval": retrieval_loss,
  "vqa": vqa_loss,
  "ve": ve_loss,
  "grounding": grounding_loss,
}
