"""Post-LN BERT / XLM-R text tower: embeddings + self-attention encoder layers.

Official behaviour: docs/fidelity.md#bert-text-tower, docs/fidelity.md#dropout-placement.

Works for any width/depth/head count (bert-base, bert-large-12l, MiniLM-L6-H384). Layers are
stacked and scanned; dropout (p = config.dropout) on the embedding output, the attention
probabilities, after the attention output dense and after the FFN output dense -- only when a
key is given. With `config.drop_path_rate` > 0 the two output dropouts are replaced by the
official token-position drop path (`branch`, docs/fidelity.md#text-drop-path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from x2vlm_jax.models import layers as L
from x2vlm_jax.models.attention import attend
from x2vlm_jax.models.config import TextConfig

TEXT_MASK_VALUE = -10000.0  # BERT's self-attention mask, docs/fidelity.md#attention-mask-values


class Attention(nnx.Module):
  """BERT attention with separate query/key/value projections `[D, H, dh]` and output `[H, dh, D]`.

  kv_width differs from width for cross-attention (keys/values come from the vision tokens).
  """

  def __init__(
    self,
    width: int,
    num_heads: int,
    *,
    kv_width: int | None = None,
    dtype,
    param_dtype,
    attention: str = "einsum",
    rngs: nnx.Rngs,
  ):
    if width % num_heads:
      raise ValueError(f"text width {width} is not divisible by {num_heads} heads")
    h, dh = num_heads, width // num_heads
    kv_width = width if kv_width is None else kv_width
    self.head_dim, self.attention = dh, attention
    init = L.normal(0.02)  # BERT initializer_range
    kw = dict(kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    heads = dict(kernel_names=("embed", "heads", "kv"), bias_names=("heads", "kv"))
    self.query = L.Dense((width,), (h, dh), **heads, **kw)
    self.key = L.Dense((kv_width,), (h, dh), **heads, **kw)
    self.value = L.Dense((kv_width,), (h, dh), **heads, **kw)
    self.out = L.Dense(
      (h, dh), (width,), kernel_names=("heads", "kv", "embed"), bias_names=("embed",), **kw
    )

  def project_kv(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, S, kv_width] -> keys, values [B, S, H, dh]."""
    return self.key(y), self.value(y)

  def __call__(
    self,
    x: jax.Array,
    kv: tuple[jax.Array, jax.Array],
    bias: jax.Array,
    *,
    dropout_rate: float,
    key: jax.Array | None,
  ) -> jax.Array:
    """x [B, L, D]; kv from `project_kv`; bias [B, 1, 1, S] -> output dense [B, L, D], before the
    residual branch (`branch`) and LN. Dropout on the probabilities only when `key` is given."""
    q = self.query(x) * self.head_dim**-0.5  # [B, L, H, dh]
    ctx = attend(q, kv[0], kv[1], bias, impl=self.attention, dropout_rate=dropout_rate, key=key)
    return self.out(ctx)


def branch(
  y: jax.Array, key: jax.Array | None, dropout_rate: float, path_rate: jax.Array | None
) -> jax.Array:
  """A sub-layer output before its residual add: hidden dropout, or, in a tower with a drop path
  (`path_rate`, this layer's traced rate), the token-position drop path with the same key and no
  hidden dropout -- the official code sets hidden dropout to 0 when the drop path is on
  (docs/fidelity.md#text-drop-path). Identity when key is None."""
  if path_rate is None:
    return L.dropout(y, dropout_rate, key)
  return L.drop_positions(y, path_rate, key)


class TextLayer(nnx.Module):
  """x = LN(x + branch(attn(x))); x = LN(x + branch(fc2(gelu(fc1 x)))) (`branch`: dropout or
  drop path)."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, attention="einsum", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.rate = cfg.dropout
    self.attn = Attention(cfg.width, cfg.num_heads, attention=attention, **kw)
    self.attn_norm = L.LayerNorm(cfg.width, cfg.ln_eps, **kw)
    self.mlp = L.Mlp(cfg.width, cfg.mlp_dim, kernel_init=L.normal(0.02), **kw)
    self.mlp_norm = L.LayerNorm(cfg.width, cfg.ln_eps, **kw)

  def __call__(self, x, bias, keys, deterministic: bool, path_rate=None):
    """keys [3]: attention probabilities, attention output, FFN output; path_rate: None (no drop
    path) or this layer's drop-path rate."""
    ks = [None] * 3 if deterministic else [keys[i] for i in range(3)]
    a = self.attn(x, self.attn.project_kv(x), bias, dropout_rate=self.rate, key=ks[0])
    x = self.attn_norm(x + branch(a, ks[1], self.rate, path_rate))
    f = branch(self.mlp(x), ks[2], self.rate, path_rate)
    return L.constrain(self.mlp_norm(x + f), L.ACT)


class TextEmbeddings(nnx.Module):
  """word + absolute position + token-type(0) embeddings -> LayerNorm -> dropout.

  BERT positions are 0..L-1. XLM-R (`kind` "xlmr") positions follow RoBERTa's
  `create_position_ids_from_input_ids`: pad_id + (rank of the token among the real tokens), and
  pad_id on padded tokens. We take "real" from the attention mask, not from `ids != pad_id`, so
  a batch padded with any id (our batches pad with 0, which is XLM-R's <s>) gets the official
  positions; padded ids are also replaced by pad_id, so padded rows equal the official ones.
  """

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    init = L.normal(0.02)
    self.cfg, self.dtype = cfg, dtype
    self.word = L.param(rngs, init, (cfg.vocab_size, cfg.width), ("vocab", "embed"), param_dtype)
    # nn.Embedding(padding_idx=pad) + BERT's _init_weights: the [PAD] row starts at zero.
    self.word[...] = self.word[...].at[cfg.pad_token_id].set(0)
    self.position = L.param(
      rngs, init, (cfg.max_positions, cfg.width), ("positions", "embed"), param_dtype
    )
    if cfg.kind == "xlmr":  # RoBERTa's position table is an Embedding with padding_idx too
      self.position[...] = self.position[...].at[cfg.pad_token_id].set(0)
    self.token_type = L.param(
      rngs, init, (cfg.type_vocab_size, cfg.width), (None, "embed"), param_dtype
    )
    self.norm = L.LayerNorm(cfg.width, cfg.ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(
    self,
    ids: jax.Array,
    key: jax.Array | None,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
  ) -> jax.Array:
    """ids [B, L] -> [B, L, D]. mask [B, L] is needed by XLM-R (its positions count real
    tokens); positions [B, L] (BERT; default 0..L-1: captioning gives an inserted [MASK] the
    position of the token it predicts)."""
    length = ids.shape[1]
    if self.cfg.kind == "xlmr":
      if mask is None:
        raise ValueError("an XLM-R text tower needs the attention mask for its position ids")
      real = (mask > 0).astype(jnp.int32)
      ids = jnp.where(real > 0, ids, self.cfg.pad_token_id)
      pos = jnp.cumsum(real, axis=1) * real + self.cfg.pad_token_id  # [B, L]
      pos_emb = jnp.take(self.position[...], pos, axis=0)  # [B, L, D]
    elif positions is None:
      pos_emb = self.position[...][:length][None]  # positions 0..L-1
    else:
      pos_emb = jnp.take(self.position[...], positions, axis=0)  # [B, L, D]
    x = jnp.take(self.word[...], ids, axis=0)  # [B, L, D]
    # Token type 0 for every token (the official code never sets types).
    x = x + pos_emb + self.token_type[...][0][None, None]
    x = self.norm(x.astype(self.dtype))
    return L.dropout(x, self.cfg.dropout, key)


class TextTower(nnx.Module):
  """ids [B, L] + mask [B, L] -> hidden states [B, L, D] (output of the last text layer)."""

  def __init__(
    self,
    cfg: TextConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool | str = False,
    unroll: int | bool = 1,
    attention: str = "einsum",
    rngs: nnx.Rngs,
  ):
    if not 0.0 <= cfg.drop_path_rate < 1.0:
      raise ValueError(f"TextConfig.drop_path_rate must be in [0, 1), got {cfg.drop_path_rate}")
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.cfg, self.remat = cfg, remat
    self.unroll = unroll  # layers per scan iteration (ModelConfig.scan_unroll)
    self.embeddings = TextEmbeddings(cfg, rngs=rngs, **kw)
    self.layers = L.stacked(
      lambda r: TextLayer(cfg, attention=attention, rngs=r, **kw), cfg.depth, rngs
    )

  def __call__(
    self,
    ids: jax.Array,
    mask: jax.Array,
    key: jax.Array | None = None,
    positions: jax.Array | None = None,
  ) -> jax.Array:
    """mask: key mask [B, L], or a per-example attention mask [B, L, L] (row = query; BERT
    only); positions [B, L] or None (0..L-1)."""
    if ids.ndim != 2 or mask.shape not in (ids.shape, ids.shape + ids.shape[1:]):
      raise ValueError(
        f"text ids {ids.shape} must be [B, L] and mask {mask.shape} [B, L] or [B, L, L]"
      )
    if self.cfg.kind == "xlmr" and (mask.ndim != 2 or positions is not None):
      raise ValueError("an XLM-R text tower takes a key mask [B, L] and derives its positions")
    if positions is not None and positions.shape != ids.shape:
      raise ValueError(f"positions {positions.shape} must match ids {ids.shape}")
    if ids.shape[1] > self.cfg.max_length:
      raise ValueError(
        f"text length {ids.shape[1]} exceeds {self.cfg.max_length} "
        f"(max_positions {self.cfg.max_positions}, {self.cfg.kind} positions)"
      )
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"text ids must be integers, got {ids.dtype}")
    k_emb, k_layers = (None, None) if key is None else tuple(jax.random.split(key))
    emb_mask = mask if mask.ndim == 2 else None
    x = L.constrain(self.embeddings(ids, k_emb, emb_mask, positions), L.ACT)
    bias = L.attention_bias(mask, TEXT_MASK_VALUE)  # [B, 1, 1 or L, L]
    keys = L.layer_keys(k_layers, self.cfg.depth, 3)
    deterministic = key is None
    xs = (keys,)
    # The drop path's per-layer rates are scanned only when it can act (nothing extra otherwise).
    if not deterministic and self.cfg.drop_path_rate > 0.0:
      xs = xs + (jnp.asarray(L.path_rates(self.cfg.drop_path_rate, self.cfg.depth)),)

    def body(layer, h, xs):
      rate = xs[1] if len(xs) == 2 else None
      return layer(h, bias, xs[0], deterministic, path_rate=rate)

    return L.scan_layers(self.layers, body, x, xs, remat=self.remat, unroll=self.unroll)
