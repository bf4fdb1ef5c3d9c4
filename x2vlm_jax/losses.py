"""Pre-training losses of X2-VLM as pure functions on arrays (docs/fidelity.md#losses).

Everything is computed in float32 whatever the input dtype. Padding rows (`valid` = 0) take part
in no loss: they are dropped from the rows *and* (for the in-batch similarity losses) from the
columns, so a padded batch gives exactly the loss of the unpadded one.

- `itc_loss`: contrastive loss on the global batch (docs/fidelity.md#itc-loss), optional soft
  targets from `ids`, and the optional 1/W gradient quirk of the official all-gather
  (`grad_scale`, docs/fidelity.md#itc-gradient-scaling).
- `sample_hard_negatives` / `sample_hard_negatives_sharded`: ITM hard negatives drawn per data
  shard, as the official code draws them per GPU (docs/fidelity.md#itm-hard-negatives).
- `itm_loss`, `mlm_loss`, `box_loss` and `combine` (docs/fidelity.md#loss-weights-and-total):
  the weighted total and a flat metrics dict.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from x2vlm_jax import box_ops, sharding

# Finite stand-in for -inf when masking logits: keeps 0 * logp finite for masked entries.
_MASKED_LOGIT = -1e9
# Added to every hard-negative weight before the positives are zeroed (official,
# docs/fidelity.md#itm-hard-negatives).
_NEG_WEIGHT_FLOOR = 1e-5


# --------------------------------------------------------------------------------------------
# helpers


def _f32(x) -> jnp.ndarray:
  return jnp.asarray(x, jnp.float32)


def _row_weights(valid, n: int, name: str) -> jnp.ndarray:
  """valid [N] (bool/int/float) or None -> float32 [N] of 0/1 weights."""
  if valid is None:
    return jnp.ones((n,), jnp.float32)
  valid = jnp.asarray(valid)
  if valid.shape != (n,):
    raise ValueError(f"{name}: expected shape ({n},) to match the batch, got {valid.shape}")
  return (valid > 0).astype(jnp.float32)


def _check_shape(x, ndim: int, name: str, fn: str) -> None:
  if jnp.ndim(x) != ndim:
    raise ValueError(f"{fn}: {name} must have rank {ndim}, got shape {jnp.shape(x)}")


def _safe_mean(values: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """Weighted mean; 0 (not NaN, with a zero gradient) when the weights sum to 0."""
  total = jnp.sum(weights)
  return jnp.where(total > 0, jnp.sum(values * weights) / jnp.where(total > 0, total, 1.0), 0.0)


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """x / max(||x||, eps) along the last axis (PyTorch `F.normalize`), NaN-free gradient at 0.

  Idempotent (value and gradient) on already unit-norm features, so the losses may apply it to
  the model's normalised ITC features without changing the official numbers.
  """
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _masked_log_softmax(logits: jnp.ndarray, col_ok: jnp.ndarray) -> jnp.ndarray:
  """log_softmax over the last axis with the columns where col_ok is False excluded."""
  return jax.nn.log_softmax(jnp.where(col_ok, logits, _MASKED_LOGIT), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: jnp.ndarray, scale: float) -> jnp.ndarray:
  """Identity in the forward pass; multiplies the incoming gradient by `scale` (a Python float)."""
  return x


def _scale_gradient_fwd(x, scale):
  del scale
  return x, None


def _scale_gradient_bwd(scale, _, g):
  return (g * jnp.asarray(scale, g.dtype),)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def _positives(n: int, ids) -> jnp.ndarray:
  """Positive-pair mask [n, n]: the diagonal, or every pair with equal ids."""
  if ids is None:
    return jnp.eye(n, dtype=bool)
  ids = jnp.asarray(ids)
  return ids[:, None] == ids[None, :]


# --------------------------------------------------------------------------------------------
# ITC (docs/fidelity.md#itc-loss)


def itc_loss(image_feat, text_feat, temp, valid=None, ids=None, grad_scale: float | None = None):
  """Symmetric image-text contrastive loss over the whole (global) batch.

  Args:
    image_feat: [N, E] vision ITC features (normalised here; idempotent if already unit norm).
    text_feat: [N, E] text ITC features; row i is the caption of image row i.
    temp: scalar temperature (clamped by the train step, not here); logits = cos / temp.
    valid: optional [N]; rows with valid = 0 are removed from the rows and the columns.
    ids: optional [N] integer ids (retrieval fine-tuning): every pair with equal ids is a
      positive; targets are the positive mask normalised per row, and the text-to-image
      direction uses the same (symmetric) target matrix, as the official code does.
    grad_scale: optional factor (e.g. 1/W) applied only to the gradient flowing into the
      features, never to `temp`: the official all-gather keeps only the local slice of the
      gradient, so encoders see 1/W of the global ITC gradient while temp sees all of it
      (docs/fidelity.md#itc-gradient-scaling). None or 1 = ordinary autodiff. The loss value is
      unchanged.

  Returns:
    Scalar float32: 0.5 * (mean_i CE(i2t row i) + mean_j CE(t2i row j)) over valid rows.
  """
  _check_shape(image_feat, 2, "image_feat", "itc_loss")
  _check_shape(text_feat, 2, "text_feat", "itc_loss")
  if jnp.shape(image_feat) != jnp.shape(text_feat):
    raise ValueError(
      f"itc_loss: image_feat {jnp.shape(image_feat)} and text_feat "
      f"{jnp.shape(text_feat)} must have the same shape [N, E]"
    )
  n = image_feat.shape[0]
  w = _row_weights(valid, n, "itc_loss valid")
  if ids is not None and jnp.shape(ids) != (n,):
    raise ValueError(f"itc_loss: ids must have shape ({n},), got {jnp.shape(ids)}")
  v, t = _f32(image_feat), _f32(text_feat)
  if grad_scale is not None and grad_scale != 1:
    v, t = scale_gradient(v, float(grad_scale)), scale_gradient(t, float(grad_scale))
  v, t = l2_normalize(v), l2_normalize(t)
  logits = v @ t.T / _f32(temp)  # [N, N] rows = images, columns = texts
  ok = w > 0
  pos = _positives(n, ids) & ok[:, None] & ok[None, :]  # [N, N]
  pos = pos.astype(jnp.float32)
  target = pos / jnp.maximum(jnp.sum(pos, axis=1, keepdims=True), 1.0)  # rows sum to 1
  i2t = -jnp.sum(target * _masked_log_softmax(logits, ok[None, :]), axis=1)  # [N]
  t2i = -jnp.sum(target * _masked_log_softmax(logits.T, ok[None, :]), axis=1)  # [N]
  return 0.5 * (_safe_mean(i2t, w) + _safe_mean(t2i, w))


# --------------------------------------------------------------------------------------------
# ITM hard negatives (docs/fidelity.md#itm-hard-negatives)


def _negative_weights(sim: jnp.ndarray, ok: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
  """softmax(sim) over valid columns + 1e-5, then positives and invalid columns zeroed. [b, b]."""
  p = jax.nn.softmax(jnp.where(ok[None, :], sim, _MASKED_LOGIT), axis=-1) + _NEG_WEIGHT_FLOOR
  return jnp.where(ok[None, :] & ~pos, p, 0.0)


def _draw(key, weights: jnp.ndarray) -> jnp.ndarray:
  """One categorical draw per row of `weights` [b, b]; a row with no candidate returns itself."""
  b = weights.shape[0]
  idx = jax.random.categorical(key, jnp.log(weights), axis=-1)  # log(0) = -inf: never drawn
  return jnp.where(jnp.any(weights > 0, axis=-1), idx, jnp.arange(b)).astype(jnp.int32)


def _local_hard_negatives(key, shard_index, v, t, temp, w, ids):
  """Hard negatives inside one data shard. v, t [b, E]; w [b]; ids [b] or None -> local idx.

  The per-shard key is `fold_in(key, shard_index)`, shared by the vmapped and the shard_map
  implementations so that both give identical draws.
  """
  k_img, k_txt = jax.random.split(jax.random.fold_in(key, shard_index))
  v = l2_normalize(jax.lax.stop_gradient(_f32(v)))
  t = l2_normalize(jax.lax.stop_gradient(_f32(t)))
  sim = v @ t.T / jax.lax.stop_gradient(_f32(temp))  # [b, b] rows = images
  ok = w > 0
  pos = _positives(v.shape[0], ids)
  neg_text = _draw(k_txt, _negative_weights(sim, ok, pos))  # a text for every image
  neg_image = _draw(k_img, _negative_weights(sim.T, ok, pos.T))  # an image for every text
  return neg_image, neg_text


def _check_negative_inputs(image_feat, text_feat, valid, ids, fn: str):
  _check_shape(image_feat, 2, "image_feat", fn)
  _check_shape(text_feat, 2, "text_feat", fn)
  if jnp.shape(image_feat) != jnp.shape(text_feat):
    raise ValueError(
      f"{fn}: image_feat {jnp.shape(image_feat)} and text_feat "
      f"{jnp.shape(text_feat)} must have the same shape [B, E]"
    )
  n = image_feat.shape[0]
  w = _row_weights(valid, n, f"{fn} valid")
  if ids is not None and jnp.shape(ids) != (n,):
    raise ValueError(f"{fn}: ids must have shape ({n},), got {jnp.shape(ids)}")
  return n, w


def sample_hard_negatives(
  key, image_feat, text_feat, temp, valid=None, ids=None, num_shards: int = 1
):
  """Draws one hard-negative image per text and one hard-negative text per image.

  As the official code (docs/fidelity.md#itm-hard-negatives), weights are softmax(sim / temp)
  + 1e-5 over each row, with the positives (the diagonal, or every pair with equal `ids`) and
  padding rows/columns set to 0; similarities are under stop_gradient. The batch is split into
  `num_shards` contiguous shards and every row draws only from its own shard, as the official
  code draws per GPU; shard s uses the key `fold_in(key, s)`, so
  `sample_hard_negatives_sharded` on a mesh with that many batch shards returns exactly the same
  indices.

  Args:
    key: PRNG key.
    image_feat, text_feat: [B, E] ITC features (pair i = image i with text i).
    temp: scalar temperature.
    valid: optional [B] padding mask.
    ids: optional [B] ids; equal ids are never drawn as each other's negatives.
    num_shards: number of contiguous data shards; must divide B.

  Returns:
    (neg_image_idx [B], neg_text_idx [B]) int32 global row indices. A row without any eligible
    negative in its shard (e.g. the only valid row of a shard) gets its own index back; the
    caller can drop those pairs with `idx != arange(B)` (see `itm_loss` neg_*_valid).
  """
  n, w = _check_negative_inputs(image_feat, text_feat, valid, ids, "sample_hard_negatives")
  if num_shards < 1 or n % num_shards:
    raise ValueError(f"sample_hard_negatives: batch {n} is not divisible into {num_shards} shards")
  b = n // num_shards

  def split(x):
    return None if x is None else jnp.reshape(x, (num_shards, b) + jnp.shape(x)[1:])

  shard = jnp.arange(num_shards)
  ids_axis = None if ids is None else 0
  local = jax.vmap(_local_hard_negatives, in_axes=(None, 0, 0, 0, None, 0, ids_axis))
  neg_image, neg_text = local(
    key, shard, split(image_feat), split(text_feat), temp, split(w), split(ids)
  )  # [S, b] each
  offset = (shard * b)[:, None]
  return (neg_image + offset).reshape(n), (neg_text + offset).reshape(n)


def sample_hard_negatives_sharded(
  mesh: Mesh,
  key,
  image_feat,
  text_feat,
  temp,
  valid=None,
  ids=None,
  batch_axes: Sequence[str] | None = None,
):
  """`sample_hard_negatives` with one shard per device slice of the batch, via `jax.shard_map`.

  Each batch shard (the product of `batch_axes` of `mesh`) samples from its own rows only, so no
  similarity matrix or feature is gathered across devices; the result is identical to
  `sample_hard_negatives(..., num_shards=<batch shards>)`. Returns global indices [B], sharded
  over `batch_axes` like the batch.
  """
  n, w = _check_negative_inputs(image_feat, text_feat, valid, ids, "sample_hard_negatives_sharded")
  batch_axes = tuple(sharding.LOGICAL_RULES["batch"] if batch_axes is None else batch_axes)
  num_shards = math.prod(mesh.shape[a] for a in batch_axes)
  if n % num_shards:
    raise ValueError(
      f"sample_hard_negatives_sharded: batch {n} is not divisible by the "
      f"{num_shards} shards of mesh axes {batch_axes}"
    )
  b = n // num_shards
  has_ids = ids is not None

  def local(key, temp, v, t, w, *maybe_ids):
    s = jax.lax.axis_index(batch_axes)  # linear shard index, row-major over batch_axes
    neg_image, neg_text = _local_hard_negatives(
      key, s, v, t, temp, w, maybe_ids[0] if has_ids else None
    )
    return neg_image + s * b, neg_text + s * b

  rows = P(batch_axes)
  args = (key, _f32(temp), image_feat, text_feat, w) + ((ids,) if has_ids else ())
  in_specs = (P(), P(), rows, rows, rows) + ((rows,) if has_ids else ())
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(rows, rows))
  return fn(*args)


# --------------------------------------------------------------------------------------------
# ITM, MLM, box


def itm_loss(
  logits_pos, logits_neg_img, logits_neg_txt, valid=None, neg_image_valid=None, neg_text_valid=None
):
  """Image-text matching cross-entropy over [positives; negatives] (docs/fidelity.md#itm-loss).

  Args:
    logits_pos: [B, 2] itm_head logits of the B positive pairs.
    logits_neg_img: [B, 2] logits of (negative image of text i, text i).
    logits_neg_txt: [B, 2] logits of (image i, negative text of image i).
    valid: optional [B] padding mask of the rows.
    neg_image_valid / neg_text_valid: optional [B] extra masks of the negative pairs (e.g.
      `neg_idx != arange(B)` for rows that found no negative); default = `valid`.

  Returns:
    Scalar float32: mean CE over the 3B (valid) rows with labels [1]*B + [0]*2B (1 = match).
  """
  for name, x in (
    ("logits_pos", logits_pos),
    ("logits_neg_img", logits_neg_img),
    ("logits_neg_txt", logits_neg_txt),
  ):
    if jnp.ndim(x) != 2 or jnp.shape(x)[1] != 2 or jnp.shape(x)[0] != jnp.shape(logits_pos)[0]:
      raise ValueError(
        f"itm_loss: {name} must be [B, 2] with B = {jnp.shape(logits_pos)[0]}, got {jnp.shape(x)}"
      )
  b = logits_pos.shape[0]
  w = _row_weights(valid, b, "itm_loss valid")
  w_img = w * _row_weights(neg_image_valid, b, "itm_loss neg_image_valid")
  w_txt = w * _row_weights(neg_text_valid, b, "itm_loss neg_text_valid")
  logits = _f32(jnp.concatenate([logits_pos, logits_neg_img, logits_neg_txt], axis=0))  # [3B, 2]
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]  # [3B]
  return _safe_mean(nll, jnp.concatenate([w, w_img, w_txt]))


def mlm_loss(logits, labels, weights):
  """Masked-LM cross-entropy, token-level mean over the real masked positions.

  Official behaviour: docs/fidelity.md#mlm-loss.

  Args:
    logits: [B, M, V] MLM logits at the gathered masked positions (any float dtype).
    labels: [B, M] original token ids; padded slots may hold anything (0 or -100).
    weights: [B, M] 1 for a real masked position, 0 for padding; labels < 0 are also ignored.

  Returns:
    (loss, accuracy) float32 scalars; both 0 (no NaN) when there is no masked token.
  """
  _check_shape(logits, 3, "logits", "mlm_loss")
  if jnp.shape(labels) != jnp.shape(logits)[:2] or jnp.shape(weights) != jnp.shape(logits)[:2]:
    raise ValueError(
      f"mlm_loss: labels {jnp.shape(labels)} and weights {jnp.shape(weights)} "
      f"must be [B, M] = {jnp.shape(logits)[:2]}"
    )
  vocab = logits.shape[-1]
  labels = jnp.asarray(labels, jnp.int32)
  w = _f32(weights) * (labels >= 0)
  safe_labels = jnp.clip(labels, 0, vocab - 1)  # padded slots gather a real row, weight 0
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)  # [B, M, V]
  nll = -jnp.take_along_axis(logp, safe_labels[..., None], axis=-1)[..., 0]  # [B, M]
  correct = (jnp.argmax(logits, axis=-1) == safe_labels).astype(jnp.float32)
  return _safe_mean(nll, w), _safe_mean(correct, w)


def box_loss(pred, target, is_image, valid=None):
  """L1 + GIoU box loss of region texts (docs/fidelity.md#box-loss).

  Args:
    pred: [B, 4] predicted (cx, cy, w, h) in [0, 1] (after the sigmoid).
    target: [B, 4] target (cx, cy, w, h).
    is_image: [B] 1 for whole-image captions: not supervised (`calc_image_bbox_loss: False`).
    valid: optional [B] padding mask.

  Returns:
    (l1, giou) float32 scalars: L1 summed over the 4 coordinates and the kept rows, and
    sum(1 - GIoU) over the kept rows, each divided by num_boxes = number of kept rows. With no
    kept row both are 0 (the official code divides by zero). If any valid predicted or target
    box is degenerate (x1 < x0 or y1 < y0), the GIoU term is 0 for the whole batch, as the
    official early check does; zero-size boxes are not degenerate and give a finite GIoU.
  """
  for name, x in (("pred", pred), ("target", target)):
    if jnp.ndim(x) != 2 or jnp.shape(x)[1] != 4:
      raise ValueError(f"box_loss: {name} must be [B, 4] (cx, cy, w, h), got {jnp.shape(x)}")
  if jnp.shape(pred) != jnp.shape(target):
    raise ValueError(f"box_loss: pred {jnp.shape(pred)} and target {jnp.shape(target)} differ")
  b = pred.shape[0]
  w = _row_weights(valid, b, "box_loss valid")
  if jnp.shape(is_image) != (b,):
    raise ValueError(f"box_loss: is_image must have shape ({b},), got {jnp.shape(is_image)}")
  keep = w * (jnp.asarray(is_image) == 0)  # [B]
  p, t = _f32(pred), _f32(target)
  l1_rows = jnp.sum(jnp.abs(p - t), axis=-1)  # [B], summed (not averaged) over coordinates
  bp, bt = box_ops.cxcywh_to_xyxy(p), box_ops.cxcywh_to_xyxy(t)
  degenerate = jnp.any((box_ops.is_degenerate(bp) | box_ops.is_degenerate(bt)) & (w > 0))
  giou_rows = 1.0 - box_ops.elementwise_giou(bp, bt)  # [B] = 1 - diag(pairwise GIoU)
  giou = jnp.where(degenerate, 0.0, _safe_mean(giou_rows, keep))
  return _safe_mean(l1_rows, keep), giou


# --------------------------------------------------------------------------------------------
# total (docs/fidelity.md#loss-weights-and-total)


TERMS = ("itc", "itm", "mlm", "box_l1", "box_giou")


def combine(
  terms: Mapping[str, Mapping[str, jnp.ndarray]],
  weights: Mapping[str, float],
  term_weights: Mapping[str, float] | None = None,
):
  """Weighted total of per-kind loss terms and a flat metrics dict.

  Official behaviour: docs/fidelity.md#loss-weights-and-total.

  Args:
    terms: kind -> term name -> scalar, e.g. {'image': {'itc': .., 'itm': .., 'mlm': ..},
      'region': {.., 'box_l1': .., 'box_giou': ..}}.
    weights: kind -> `iter_perc` weight; a kind missing here gets 1.0 (the official default);
      weights of kinds absent from `terms` are ignored (a kind with batch size 0).
    term_weights: optional term name (one of TERMS) -> weight, applied in every kind; a term
      missing here gets 1.0, the official weight of every term.

  Returns:
    (total, metrics): total = sum_kind weight * sum_term term_weight * value; metrics has
    'loss/<term>/<kind>' (unweighted) for every term and 'loss/total'.
  """
  term_weights = dict(term_weights or {})
  unknown = set(term_weights) - set(TERMS)
  if unknown:
    raise ValueError(
      f"combine: unknown loss terms {sorted(unknown)} in term_weights; known: {TERMS}"
    )
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for kind, kind_terms in terms.items():
    weight = float(weights.get(kind, 1.0))
    for name, value in kind_terms.items():
      if jnp.ndim(value) != 0:
        raise ValueError(
          f"combine: term {kind}/{name} must be a scalar, got shape {jnp.shape(value)}"
        )
      value = _f32(value)
      metrics[f"loss/{name}/{kind}"] = value
      total = total + weight * float(term_weights.get(name, 1.0)) * value
  metrics["loss/total"] = total
  return total, metrics
