"""COCO captioning as the official code trains it: the pre-trained MLM head over the text and
fusion towers, UniLM-style left to right (`XVLMForMLMCaptioning`, docs/finetuning.md#captioning).

Input (built on the host, `data_pipelines/caption_examples.py`): `[CLS] a picture of caption
[SEP]` cut to max_tokens, with a `[MASK]` inserted before every masked caption token (the
"FG-free" scheme the official config switches on): the [MASK] gets the position id of the token
it stands before and predicts it. Every row runs through the text and fusion towers (all 18
official layers, the whole image visible) under its own attention mask (`caption_attention`):
lower-triangular, and every inserted [MASK] column hidden from every other row, so a real token
never sees a [MASK] and a [MASK] sees only the real tokens before it and itself -- exactly what
generation sees (`caption_decode.py`).

Loss (`smoothed_kl`): at each [MASK] the KL divergence between the smoothed target -- 1 - eps
on the true token, eps / (V - 2) on every other id except [CLS], which gets 0 -- and the MLM
head's softmax, summed over V; averaged over the real masks of the batch (+1e-5 in the
denominator, as the official normaliser). eps = `StepConfig.label_smoothing` (official 0.1).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from data_pipelines import features as F
from x2vlm_jax.models.x2vlm import X2VLM
from x2vlm_jax.tasks_vqa import split_keys


def caption_attention(inserted: jax.Array) -> jax.Array:
  """The per-example attention mask of the official FG-free captioning input: inserted [B, Lc]
  (1 at an inserted [MASK]) -> int32 [B, Lc, Lc] (row = query): j <= i, and column j hidden
  from every row but its own when j is an inserted [MASK]. Padding sits after the real tokens,
  so the lower triangle alone keeps it out of every real row's view (as in the official)."""
  lc = inserted.shape[1]
  idx = jnp.arange(lc)
  causal = idx[None, :] <= idx[:, None]  # [Lc, Lc]
  hidden = (inserted[:, None, :] == 1) & (idx[None, :, None] != idx[None, None, :])
  return (causal[None] & ~hidden).astype(jnp.int32)


def caption_states(model: X2VLM, pixels, ids, positions, attention, keys=(None, None, None)):
  """Fused states [B, Lc, Dt] of captioning inputs: image [B, R, R, 3], ids / positions
  [B, Lc], attention [B, Lc, Lc]."""
  vision = model.encode_image(pixels, keys[0])  # [B, S, Dv]
  text = model.encode_text(ids, attention, keys[1], positions)  # [B, Lc, Dt]
  vision_mask = jnp.ones(vision.shape[:2], jnp.int32)  # the whole image
  return model.fuse(text, attention, vision, vision_mask, key=keys[2])


def smoothed_kl(logits, labels, weights, ignore_id, smoothing: float) -> jax.Array:
  """The official label-smoothed masked-token loss (module docstring).

  logits [B, M, V], labels [B, M], weights [B, M] (1 = a real mask), ignore_id [B] or scalar
  (the [CLS] id: no smoothing mass, and a label equal to it is ignored) -> scalar.
  """
  v = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, M, V]
  ignore = jnp.broadcast_to(jnp.asarray(ignore_id), labels.shape[:1])[:, None]  # [B, 1]
  vocab = jnp.arange(v)
  q = jnp.where(vocab[None, None, :] == ignore[:, :, None], 0.0, smoothing / (v - 2))
  q = jnp.where(vocab[None, None, :] == labels[:, :, None], 1.0 - smoothing, q)  # [B, M, V]
  q = jnp.where((labels == ignore)[:, :, None], 0.0, q)
  kl = jnp.sum(jnp.where(q > 0, q * (jnp.log(jnp.maximum(q, 1e-30)) - logp), 0.0), -1)  # [B, M]
  w = weights.astype(jnp.float32)
  return jnp.sum(kl * w) / (jnp.sum(w) + 1e-5)


def caption_loss(model: X2VLM, b: Mapping[str, jax.Array], key, smoothing: float, det: bool):
  """(loss, metrics) of one captioning batch (the image kind with the caption fields)."""
  keys = split_keys(key, 3, det)
  ids = b[F.CAPTION_IDS]
  attention = caption_attention(b[F.CAPTION_INSERTED])
  fused = caption_states(model, b[F.PIXELS], ids, b[F.CAPTION_POSITIONS], attention, keys)
  logits = model.mlm_logits(fused, b[F.MLM_POSITIONS])  # [B, M, V]
  weights = b[F.MLM_WEIGHTS] * b[F.VALID].astype(jnp.float32)[:, None]
  loss = smoothed_kl(logits, b[F.MLM_LABELS], weights, ids[:, 0], smoothing)
  right = (jnp.argmax(logits, -1) == b[F.MLM_LABELS]).astype(jnp.float32) * weights
  acc = jnp.sum(right) / jnp.maximum(jnp.sum(weights), 1.0)
  return loss, {"loss/caption/image": loss, "loss/total": loss, "acc/caption_mask": acc}


def make_loss(step_cfg, mesh=None):
  """`loss(model, batch, key, itm)` of the 'caption' task (`tasks.Task.loss`)."""
  del mesh

  def loss(model: X2VLM, batch, key, itm: bool = True):
    del itm
    b = batch[F.IMAGE]
    return caption_loss(model, b, key, step_cfg.label_smoothing, step_cfg.deterministic)

  return loss
