"""Incremental (cached) forward of the text and fusion towers, for left-to-right captioning.

The official caption generator (`XVLMForMLMCaptioning.beam_search`) runs all 18 text+fusion
layers over only the newest tokens at every step and reuses every earlier position's per-layer
hidden states as extra keys/values of self-attention (`history_states`). That is exact because
of the captioning attention mask: a position never attends to a later one, so the states of
earlier positions do not change when tokens are appended. Here the cache holds what those
states are used for -- each layer's self-attention keys and values -- so a step projects only
the new tokens:

  cache  SelfKV: key, value [layers, N, C, H, dh] for the text tower and for the fusion tower
  step   ids, positions [N, T] of the T new tokens, their own attention mask [N, T, T], which
         cached slots each row may see [N, C] -> (states [N, T, Dt], the new tokens' keys and
         values [layers, N, T, H, dh] per tower, for the caller to write into the cache)

Cross-attention keys/values depend only on the image (`X2VLM.vision_kv`, computed once per
image and gathered per row with `kv_index`). Deterministic (evaluation: no dropout).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from x2vlm_jax.models import layers as L
from x2vlm_jax.models.fusion import VisionKV
from x2vlm_jax.models.text import TEXT_MASK_VALUE
from x2vlm_jax.models.x2vlm import X2VLM


class SelfKV(NamedTuple):
  """Self-attention keys and values of every layer of one tower, [layers, N, C, H, dh] each."""

  key: jax.Array
  value: jax.Array


class Cache(NamedTuple):
  """The text tower's and the fusion tower's self-attention caches."""

  text: SelfKV
  fusion: SelfKV


def empty_cache(model: X2VLM, n: int, length: int) -> Cache:
  """Zero caches of `length` slots for n rows."""
  cfg = model.cfg
  h, dh = cfg.text.num_heads, cfg.text.width // cfg.text.num_heads
  hf, dhf = cfg.fusion.num_heads, cfg.text.width // cfg.fusion.num_heads

  def kv(depth, heads, dim):
    z = jnp.zeros((depth, n, length, heads, dim), cfg.dtype)
    return SelfKV(z, z)

  return Cache(kv(cfg.text.depth, h, dh), kv(cfg.fusion.depth, hf, dhf))


def _self_attend(attn, x, past_k, past_v, bias):
  """Self-attention of the new tokens x [N, T, D] over the cached keys/values [N, C, H, dh]
  followed by their own; bias [N, 1, T, C + T]. Returns (output dense [N, T, D], (k, v) of x)."""
  k, v = attn.project_kv(x)  # [N, T, H, dh]
  full = (jnp.concatenate([past_k, k], axis=1), jnp.concatenate([past_v, v], axis=1))
  return attn(x, full, bias, dropout_rate=0.0, key=None), (k, v)


def _scan(layers, body, x, xs):
  scan = nnx.scan(
    body,
    in_axes=(0, nnx.Carry, 0),
    out_axes=(nnx.Carry, 0),
    transform_metadata={nnx.PARTITION_NAME: "layers"},
  )
  return scan(layers, x, xs)


def extend(
  model: X2VLM,
  ids: jax.Array,
  positions: jax.Array,
  new_mask: jax.Array,
  cache: Cache,
  cache_mask: jax.Array,
  vision: VisionKV,
  kv_index: jax.Array,
) -> tuple[jax.Array, Cache]:
  """Runs T new tokens through the text and fusion towers against the cache.

  Args:
    ids, positions: int32 [N, T] of the new tokens.
    new_mask: [N, T, T] which new tokens each new token sees (row = query).
    cache: keys/values of earlier positions, C slots; cache_mask [N, C] the slots every new
      token may see (1) -- slots not yet written must be 0.
    vision: the fusion tower's cross-attention K/V of the images [layers, Ni, S, H, dh];
      kv_index [N] each row's image (every vision token visible).
  Returns:
    (states of the new tokens after the fusion tower [N, T, Dt], their keys/values as a Cache of
    T slots).
  """
  n, t = ids.shape
  c = cache_mask.shape[1]
  keep = jnp.concatenate(
    [jnp.broadcast_to(cache_mask[:, None, :], (n, t, c)), new_mask.astype(cache_mask.dtype)], -1
  )  # [N, T, C + T]
  bias = L.attention_bias(keep, TEXT_MASK_VALUE)  # [N, 1, T, C + T]
  x = model.text.embeddings(ids, None, positions=positions)  # [N, T, Dt]

  def text_body(layer, h, past):
    a, new = _self_attend(layer.attn, h, past[0], past[1], bias)
    h = layer.attn_norm(h + a)
    return layer.mlp_norm(h + layer.mlp(h)), new

  x, (tk, tv) = _scan(model.text.layers, text_body, x, tuple(cache.text))
  s = vision.key.shape[2]
  vision_bias = L.padding_bias(jnp.ones((n, s), jnp.int32), model.cfg.fusion.cross_mask_value)

  def fusion_body(layer, h, xs):
    (pk, pv), (vk, vv) = xs
    a, new = _self_attend(layer.self_attn, h, pk, pv, bias)
    h = layer.self_norm(h + a)
    kv = (jnp.take(vk, kv_index, axis=0), jnp.take(vv, kv_index, axis=0))  # [N, S, H, dh]
    h = layer.cross_norm(h + layer.cross_attn(h, kv, vision_bias, dropout_rate=0.0, key=None))
    return layer.mlp_norm(h + layer.mlp(h)), new

  xs = (tuple(cache.fusion), (vision.key, vision.value))
  x, (fk, fv) = _scan(model.fusion.layers, fusion_body, x.astype(model.cfg.dtype), xs)
  return x, Cache(SelfKV(tk, tv), SelfKV(fk, fv))


def write(cache: Cache, new: Cache, slot: jax.Array | int, count: int = 1) -> Cache:
  """The cache with the first `count` new tokens' keys/values written from slot `slot` on."""

  def put(old, upd):
    upd = upd[:, :, :count].astype(old.dtype)
    return jax.lax.dynamic_update_slice_in_dim(old, upd, slot, axis=2)

  return jax.tree.map(put, cache, new)


def reorder(cache: Cache, rows: jax.Array) -> Cache:
  """The cache rows gathered by `rows` [N] (beams following their parents)."""
  return jax.tree.map(lambda a: jnp.take(a, rows, axis=1), cache)
