"""The six MVPTR pre-training objectives as pure functions on arrays (docs/mvptr.md#objectives).

Each objective where the paper and the released code differ takes `variant` = "paper" (default:
what the results claim) or "code" (Junction4Nako/mvp_pytorch, `BiBertImgForPreTraining`); the
facts are in MVPTR_REFERENCE.md section 3. Everything is float32.

- MCR (visual tags / textual phrases): `mcr_loss` -- masked-concept cross-entropy. Paper: labels
  assigned to the masked slots by Hungarian matching (in-graph `mvptr_assign.hungarian_targets`,
  fed back as `labels`), phrases included. Code: plain word-piece CE on tags at their own slots
  (the same CE, labels unpermuted) and *no* phrase loss (`mcr_loss(..., enabled=False)` = 0).
- VSC: `vsc_loss` -- symmetric InfoNCE, exp(logit_scale) x cosine; paper over the global batch,
  code per device (`shards` contiguous blocks of the batch, as each GPU's local batch).
- WPG: `phrase_region_score` (paper: max over regions; code: one of the top-3 chosen uniformly) and
  `wpg_loss` (hinge 0.2 over texts with >= 1 phrase); negatives from `pick_negatives`.
- ITM: `pick_negatives` (paper: sampled from the VSC softmax; code: argmax hardest), `itm_pairs`
  (the code's random half split into hard-image and hard-text negatives) and `itm_loss` (CE with
  the official label convention 0 = match in pre-training).
- MLM: `losses.mlm_loss` unchanged (word vocabulary, masked text slots of the joint output).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from x2vlm_jax import losses

VARIANTS = ("paper", "code")
WPG_MARGIN = 0.2
_NEG = -1e9


def _check_variant(variant: str, fn: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"{fn}: variant must be one of {VARIANTS}, got {variant!r}")


def _f32(x):
  return jnp.asarray(x, jnp.float32)


# --------------------------------------------------------------------------------------------
# MCR


def mcr_loss(logits, labels, weights, *, enabled: bool = True):
  """Masked-concept reconstruction: CE at the masked slots, mean over them.

  logits [B, M, V] over the concept vocabulary at the gathered slots; labels [B, M] (paper: the
  Hungarian-permuted concepts of `mvptr_assign.hungarian_targets`; code: the original
  word piece of each slot); weights [B, M] 1 = a real masked slot. `enabled=False` is the released
  code's textual MCR (phrase labels set to -1): the loss is exactly 0 with no gradient.
  Returns (loss, accuracy)."""
  if not enabled:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  return losses.mlm_loss(logits, labels, weights)


# --------------------------------------------------------------------------------------------
# VSC


def vsc_logits(text_feat, image_feat, logit_scale):
  """[B, D] unit features x2 -> [B, B] logits exp(logit_scale) * t . v (rows = texts; no clamp,
  as the official code)."""
  return jnp.exp(_f32(logit_scale)) * (_f32(text_feat) @ _f32(image_feat).T)


def vsc_loss(text_feat, image_feat, logit_scale, *, variant: str = "paper", shards: int = 1):
  """Symmetric InfoNCE (text->image and image->text CE averaged) on L2-normalised features.

  paper: one softmax over the global batch. code: each of `shards` contiguous blocks of the
  batch (one device's local batch) is its own contrastive problem; the result is the mean of
  the per-block losses (the official gradient all-reduce averages them)."""
  _check_variant(variant, "vsc_loss")
  b = text_feat.shape[0]
  if variant == "paper" or shards == 1:
    return _infonce(vsc_logits(text_feat, image_feat, logit_scale))
  if b % shards:
    raise ValueError(f"vsc_loss: batch {b} is not divisible into {shards} device shards")
  t = _f32(text_feat).reshape(shards, b // shards, -1)
  v = _f32(image_feat).reshape(shards, b // shards, -1)
  per = jax.vmap(lambda x, y: _infonce(vsc_logits(x, y, logit_scale)))(t, v)
  return jnp.mean(per)


def _infonce(logits):
  n = logits.shape[0]
  diag = jnp.arange(n)
  t2i = -jax.nn.log_softmax(logits, axis=1)[diag, diag]
  i2t = -jax.nn.log_softmax(logits, axis=0)[diag, diag]
  return 0.5 * (jnp.mean(t2i) + jnp.mean(i2t))


# --------------------------------------------------------------------------------------------
# Negatives for ITM and WPG


def pick_negatives(key, sim, logit_scale, mode: str, valid=None, shards: int = 1):
  """One negative column per row of `sim` [N, N] (rows = texts, columns = images for
  text->image; pass sim.T for image->text), never the row's own column. With `shards` > 1 a
  row draws only from its own contiguous block of N / shards columns (one device's local batch:
  the released code picks its negatives on each GPU).

  mode "sample": drawn from softmax(exp(logit_scale) * sim) over the other valid columns (the
  paper's hard negatives from the VSC distribution; the code's `hn_mod='sample'`).
  mode "hardest": argmax of sim - 2 I (the released code's ITM negatives).
  mode "uniform": uniformly among the other valid columns (the code's WPG negative image)."""
  n = sim.shape[0]
  ok = ~jnp.eye(n, dtype=bool)
  if shards > 1:
    block = jnp.arange(n) // _block(n, shards, "pick_negatives")
    ok = ok & (block[:, None] == block[None, :])
  if valid is not None:
    ok = ok & (jnp.asarray(valid) > 0)[None, :]
  if mode == "hardest":
    return jnp.argmax(jnp.where(ok, _f32(sim) - 2.0 * jnp.eye(n), _NEG), axis=1)
  if mode == "sample":
    logits = jnp.exp(_f32(logit_scale)) * _f32(sim)
  elif mode == "uniform":
    logits = jnp.zeros((n, n), jnp.float32)
  else:
    raise ValueError(f"pick_negatives: mode must be sample, hardest or uniform, got {mode!r}")
  return jax.random.categorical(key, jnp.where(ok, logits, _NEG), axis=1)


def _block(n: int, shards: int, fn: str) -> int:
  if n % shards:
    raise ValueError(f"{fn}: batch {n} is not divisible into {shards} device shards")
  return n // shards


def itm_pairs(key, hard_image, hard_text, shards: int = 1):
  """The code's ITM negatives: a random half of the rows pair text i with its hard image, the
  other half pair its hard text with image i; with `shards` > 1 the halves are drawn within
  each device's block (as each GPU does). Returns (text_index, image_index), each [N]: the
  image half of every block first, then the text halves."""
  n = hard_image.shape[0]
  b = _block(n, shards, "itm_pairs")
  keys = jax.random.split(key, shards)
  perm = jax.vmap(lambda k: jax.random.permutation(k, b))(keys) + (jnp.arange(shards) * b)[:, None]
  first, second = perm[:, : b // 2].reshape(-1), perm[:, b // 2 :].reshape(-1)
  texts = jnp.concatenate([first, hard_text[second]])
  images = jnp.concatenate([hard_image[first], second])
  return texts, images


def itm_loss(logits_pos, logits_neg, *, match_class: int = 0, valid_neg=None):
  """CE over [positives; negatives] of the ITM head ([N, C] and [M, C]); the matched class is
  `match_class` (0 in the official pre-training head, BERT's NSP convention; 1 in retrieval
  fine-tuning). Rows of `valid_neg` = 0 (a negative that could not be found) are left out."""
  n, m = logits_pos.shape[0], logits_neg.shape[0]
  logits = _f32(jnp.concatenate([logits_pos, logits_neg], axis=0))
  labels = jnp.concatenate(
    [jnp.full((n,), match_class, jnp.int32), jnp.full((m,), 1 - match_class, jnp.int32)]
  )
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], axis=-1)[:, 0]
  w_neg = jnp.ones((m,), jnp.float32) if valid_neg is None else _f32(valid_neg)
  w = jnp.concatenate([jnp.ones((n,), jnp.float32), w_neg])
  return jnp.sum(nll * w) / jnp.sum(w)


# --------------------------------------------------------------------------------------------
# WPG


def phrase_region_score(phrases, phrase_valid, regions, region_valid, *, variant="paper", key=None):
  """S(V, S) per text: mean over its phrases of a region cosine.

  phrases [B, P, D], regions [B, R, D] (states of the cross-modal stack: paper at layer 3, code
  at the last layer); masks [B, P], [B, R]. paper: each phrase's max cosine over regions. code:
  one of the phrase's top-3 cosines chosen uniformly (`key` needed; fewer than 3 real regions:
  among those). Returns [B] (0 for a text without phrases)."""
  _check_variant(variant, "phrase_region_score")
  p = losses.l2_normalize(_f32(phrases))
  r = losses.l2_normalize(_f32(regions))
  cos = jnp.einsum("bpd,brd->bpr", p, r)
  cos = jnp.where(jnp.asarray(region_valid)[:, None, :] > 0, cos, _NEG)
  if variant == "paper":
    best = jnp.max(cos, axis=-1)  # [B, P]
  else:
    if key is None:
      raise ValueError("phrase_region_score: the code variant draws one of the top 3: give key")
    k = min(3, cos.shape[-1])
    top, _ = jax.lax.top_k(cos, k)  # [B, P, k]
    real = jnp.maximum(jnp.sum(jnp.asarray(region_valid) > 0, axis=-1), 1)  # [B]
    limit = jnp.minimum(real, k)[:, None]  # draw among the real ones
    u = jax.random.uniform(key, top.shape[:2])
    pick = jnp.minimum(jnp.floor(u * limit).astype(jnp.int32), limit - 1)
    best = jnp.take_along_axis(top, pick[..., None], axis=-1)[..., 0]
  w = _f32(jnp.asarray(phrase_valid) > 0)
  return jnp.sum(best * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)


def wpg_loss(pos_score, neg_score, phrase_valid, margin: float = WPG_MARGIN):
  """Weakly-supervised phrase grounding: mean over texts with >= 1 phrase of
  max(0, margin + S(neg image, text) - S(own image, text)); 0 when no text has a phrase."""
  has = _f32(jnp.sum(jnp.asarray(phrase_valid) > 0, axis=-1) > 0)
  hinge = jnp.maximum(0.0, margin + _f32(neg_score) - _f32(pos_score))
  total = jnp.sum(has)
  return jnp.where(total > 0, jnp.sum(hinge * has) / jnp.maximum(total, 1.0), 0.0)
