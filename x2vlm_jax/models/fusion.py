"""Fusion tower: post-LN layers self-attn (text mask) -> cross-attn (vision) -> FFN, text width.

Layers 12-17 of the official 18-layer BERT (docs/fidelity.md#fusion-layers). Cross-attention
keys/values depend only on the vision tokens, so `vision_kv` computes them for every layer at
once (`[layers, N, S, H, dh]`) and `__call__` accepts them precomputed, optionally gathered per
text row with `kv_index` (region texts reuse their image's K/V,
docs/fidelity.md#shared-tower-calls-and-kv-reuse). Passing vision tokens goes through the same
`vision_kv`, so both routes give identical results. Dropout as in the text tower; with
`config.drop_path_rate` > 0 the three sub-layer output dropouts become the official token-position
drop path (`text.branch`, docs/fidelity.md#text-drop-path).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from x2vlm_jax.models import layers as L
from x2vlm_jax.models.config import FusionConfig, TextConfig
from x2vlm_jax.models.text import TEXT_MASK_VALUE, Attention, branch


class VisionKV(NamedTuple):
  """Cross-attention keys and values of every fusion layer, each [layers, N, S, H, dh]."""

  key: jax.Array
  value: jax.Array


class FusionLayer(nnx.Module):
  """One fusion layer; cross-attention takes precomputed per-layer K/V."""

  def __init__(
    self,
    cfg: FusionConfig,
    width: int,
    vision_width: int,
    *,
    dtype,
    param_dtype,
    attention: str = "einsum",
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.rate = cfg.dropout
    self.self_attn = Attention(width, cfg.num_heads, attention=attention, **kw)
    self.self_norm = L.LayerNorm(width, cfg.ln_eps, **kw)
    self.cross_attn = Attention(
      width, cfg.num_heads, kv_width=vision_width, attention=attention, **kw
    )
    self.cross_norm = L.LayerNorm(width, cfg.ln_eps, **kw)
    self.mlp = L.Mlp(width, cfg.mlp_dim, kernel_init=L.normal(0.02), **kw)
    self.mlp_norm = L.LayerNorm(width, cfg.ln_eps, **kw)

  def __call__(self, x, text_bias, kv, vision_bias, keys, deterministic: bool, path_rate=None):
    """keys [5]: self-attention probabilities / output, cross-attention probabilities / output,
    FFN output; path_rate: None (no drop path) or this layer's drop-path rate."""
    ks = [None] * 5 if deterministic else [keys[i] for i in range(5)]
    a = self.self_attn(
      x, self.self_attn.project_kv(x), text_bias, dropout_rate=self.rate, key=ks[0]
    )
    x = self.self_norm(x + branch(a, ks[1], self.rate, path_rate))
    c = self.cross_attn(x, kv, vision_bias, dropout_rate=self.rate, key=ks[2])
    x = self.cross_norm(x + branch(c, ks[3], self.rate, path_rate))
    f = branch(self.mlp(x), ks[4], self.rate, path_rate)
    return L.constrain(self.mlp_norm(x + f), L.ACT)


class FusionTower(nnx.Module):
  """Text states [B, L, Dt] attend to vision tokens (or their precomputed K/V) -> [B, L, Dt]."""

  def __init__(
    self,
    cfg: FusionConfig,
    text: TextConfig,
    vision_width: int,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool | str = False,
    unroll: int | bool = 1,
    causal: bool = False,
    attention: str = "einsum",
    rngs: nnx.Rngs,
  ):
    if not 0.0 <= cfg.drop_path_rate < 1.0:
      raise ValueError(f"FusionConfig.drop_path_rate must be in [0, 1), got {cfg.drop_path_rate}")
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    self.unroll = unroll  # layers per scan iteration (ModelConfig.scan_unroll)
    self.causal = causal  # self-attention sees earlier positions only (the VQA answer decoder)
    self.width, self.vision_width = text.width, vision_width
    self.layers = L.stacked(
      lambda r: FusionLayer(cfg, text.width, vision_width, attention=attention, rngs=r, **kw),
      cfg.depth,
      rngs,
    )

  def vision_kv(self, vision: jax.Array) -> VisionKV:
    """[N, S, Dv] -> VisionKV of [layers, N, S, H, dh], every layer's K/V computed once."""
    if vision.ndim != 3 or vision.shape[-1] != self.vision_width:
      raise ValueError(f"vision tokens must be [N, S, {self.vision_width}], got {vision.shape}")
    ca = self.layers.cross_attn
    x = vision.astype(self.dtype)

    def project(dense):
      w = dense.kernel[...].astype(self.dtype)  # [layers, Dv, H, dh]
      b = dense.bias[...].astype(self.dtype)  # [layers, H, dh]
      return jnp.einsum("nsd,ldhk->lnshk", x, w) + b[:, None, None]

    return VisionKV(project(ca.key), project(ca.value))

  def __call__(
    self,
    text: jax.Array,
    text_mask: jax.Array,
    vision: jax.Array | VisionKV,
    vision_mask: jax.Array,
    kv_index: jax.Array | None = None,
    key: jax.Array | None = None,
  ) -> jax.Array:
    """text [B, L, Dt], text_mask [B, L] (or an attention mask [B, L, L], row = query); vision
    [N, S, Dv] tokens or a VisionKV;
    vision_mask [B, S] (per text row); kv_index [B] picks each text's row of N (None: N == B)."""
    is_kv = isinstance(vision, VisionKV)
    b = text.shape[0]
    n, s = vision.key.shape[1:3] if is_kv else vision.shape[:2]
    if text_mask.shape not in (text.shape[:2], text.shape[:2] + text.shape[1:2]):
      raise ValueError(
        f"text_mask {text_mask.shape} must be [B, L] or [B, L, L] for text {text.shape[:2]}"
      )
    if vision_mask.shape != (b, s):
      raise ValueError(
        f"vision_mask must be [B={b}, S={s}] (one row per text), got {vision_mask.shape}"
      )
    if kv_index is None and n != b:
      raise ValueError(f"{n} vision rows for {b} texts: pass kv_index [B] to pick rows")
    if kv_index is not None and kv_index.shape != (b,):
      raise ValueError(f"kv_index must be [B={b}], got {kv_index.shape}")
    kv = vision if is_kv else self.vision_kv(vision)
    if self.causal:
      text_bias = L.causal_bias(text_mask, TEXT_MASK_VALUE)  # [B, 1, L, L]
    else:  # a key mask [B, L] or a per-example attention mask [B, L, L] (captioning)
      text_bias = L.attention_bias(text_mask, TEXT_MASK_VALUE)  # [B, 1, 1 or L, L]
    vision_bias = L.padding_bias(vision_mask, self.cfg.cross_mask_value)  # [B, 1, 1, S]
    keys = L.layer_keys(key, self.cfg.depth, 5)
    deterministic = key is None
    xs = ((kv.key, kv.value), keys)
    # The drop path's per-layer rates are scanned only when it can act (nothing extra otherwise).
    if not deterministic and self.cfg.drop_path_rate > 0.0:
      xs = xs + (jnp.asarray(L.path_rates(self.cfg.drop_path_rate, self.cfg.depth)),)

    def body(layer, h, xs):
      (k, v), ks = xs[:2]  # k, v [N, S, H, dh] of this layer
      rate = xs[2] if len(xs) == 3 else None
      if kv_index is not None:
        k, v = jnp.take(k, kv_index, axis=0), jnp.take(v, kv_index, axis=0)  # [B, S, H, dh]
      return layer(h, text_bias, (k, v), vision_bias, ks, deterministic, path_rate=rate)

    x = L.constrain(text.astype(self.dtype), L.ACT)
    return L.scan_layers(self.layers, body, x, xs, remat=self.remat, unroll=self.unroll)
