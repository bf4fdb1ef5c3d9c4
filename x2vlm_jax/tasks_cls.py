"""The classification tasks: NLVR2 (a statement about a pair of images, true / false) and video
question answering over a fixed answer vocabulary (MSRVTT-QA, MSVD-QA), each with the official
`cls_head` on fused [CLS] vectors (docs/finetuning.md#nlvr2, docs/finetuning.md#video-qa).

NLVR2 (`XVLMForNLVR`, "following VLMo"): the left images then the right images go through ONE
vision-tower call; the sentence is fused with each image separately (text and fusion towers
both run once per image, so their dropout differs between the two passes, as in the official
two `multi_modal` passes); the two fused [CLS] vectors are concatenated [B, 2 Dt] ->
cls_head -> 2 logits (class 1 = true); cross-entropy, accuracy = argmax.

Video QA (`XVLMForClassification`): the clip's frames through the vision tower, averaged with
the frame embedding as in video retrieval; the question fused with the clip; cls_head on the
fused [CLS] -> answer-vocabulary logits; cross-entropy over the questions whose answer is in
the vocabulary (label -100 ignored, the official `ignore_index`); such a question always
counts as wrong in the accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from data_pipelines import features as F
from x2vlm_jax.models.x2vlm import X2VLM
from x2vlm_jax.tasks_vqa import split_keys


def _fused_cls(model: X2VLM, vision, ids, mask, keys) -> jax.Array:
  """Fused [CLS] [B, Dt] of texts [B, L] with vision tokens [B, S, Dv] (all visible)."""
  text = model.encode_text(ids, mask, keys[0])
  vision_mask = jnp.ones(vision.shape[:2], jnp.int32)
  return model.fuse(text, mask, vision, vision_mask, key=keys[1])[:, 0]


def nlvr2_logits(model: X2VLM, pixels, pair_pixels, ids, mask, keys=(None, None, None)):
  """[B, 2] logits: left / right images [B, R, R, 3] each, sentence ids / mask [B, L]."""
  b = pixels.shape[0]
  vision = model.encode_image(jnp.concatenate([pixels, pair_pixels]), keys[0])  # [2B, S, Dv]
  both = lambda x: jnp.concatenate([x, x])
  cls = _fused_cls(model, vision, both(ids), both(mask), keys[1:])  # [2B, Dt]
  return model.cls_logits(jnp.concatenate([cls[:b], cls[b:]], axis=-1))


def video_qa_logits(model: X2VLM, frames, frame_valid, ids, mask, keys=(None, None, None)):
  """[B, C] logits: frames [B, F, R, R, 3] (+ frame_valid [B, F]), question ids / mask [B, L]."""
  vision = model.encode_video(frames, frame_valid, keys[0])  # [B, S, Dv]
  return model.cls_logits(_fused_cls(model, vision, ids, mask, keys[1:]))


def classification_loss(logits, labels, valid) -> tuple[jax.Array, jax.Array]:
  """(cross-entropy over the valid rows with a label != -100, accuracy over the valid rows with
  such rows always wrong): logits [B, C], labels [B], valid [B]."""
  use = (labels != F.IGNORE_LABEL) & (valid == 1)
  safe = jnp.where(use, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
  loss = jnp.sum(jnp.where(use, nll, 0.0)) / jnp.maximum(jnp.sum(use), 1)
  right = (jnp.argmax(logits, axis=-1) == labels) & use
  acc = jnp.sum(right) / jnp.maximum(jnp.sum(valid == 1), 1)
  return loss, acc.astype(jnp.float32)


def _loss_fn(task: str, kind: str, logits_fn):
  def make(step_cfg, mesh=None):
    del mesh

    def loss(model: X2VLM, batch: Mapping, key, itm: bool = True):
      del itm
      b = batch[kind]
      keys = split_keys(key, 3, step_cfg.deterministic)
      logits = logits_fn(model, b, keys)
      value, acc = classification_loss(logits, b[F.LABEL], b[F.VALID])
      return value, {f"loss/{task}/{kind}": value, "loss/total": value, f"acc/{task}": acc}

    return loss

  return make


make_nlvr2_loss = _loss_fn(
  F.NLVR2,
  F.IMAGE,
  lambda m, b, k: nlvr2_logits(m, b[F.PIXELS], b[F.PAIR_PIXELS], b[F.TEXT_IDS], b[F.TEXT_MASK], k),
)
make_video_qa_loss = _loss_fn(
  F.VIDEO_QA,
  F.VIDEO,
  lambda m, b, k: video_qa_logits(
    m, b[F.FRAMES], b[F.FRAME_VALID], b[F.TEXT_IDS], b[F.TEXT_MASK], k
  ),
)
