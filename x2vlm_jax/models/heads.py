"""Heads on top of the towers: ITC projections, ITM / box MLPs, tied MLM head.

Official behaviour: docs/fidelity.md#itc-projections-and-temperature,
docs/fidelity.md#itm-and-box-heads, docs/fidelity.md#tied-mlm-head. Projections and the ITM/box
MLPs use PyTorch's default Linear init (they are never loaded from BEiT/BERT,
docs/fidelity.md#head-initialisation); the MLM head is part of BERT and uses BERT's init. The
towers know nothing of heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from x2vlm_jax.models import layers as L


class Projection(L.Dense):
  """Linear(in -> E) followed by L2 normalisation (F.normalize, eps 1e-12); float32 output."""

  def __init__(self, width: int, embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    init = L.torch_linear(width)
    super().__init__(
      (width,),
      (embed_dim,),
      kernel_names=("embed", "proj"),
      bias_names=("proj",),
      kernel_init=init,
      bias_init=init,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(y), axis=-1, keepdims=True))
    return y / jnp.maximum(norm, 1e-12)  # [.., E]


class MlpHead(nnx.Module):
  """`build_mlp`: Linear(D -> 2D) -> LayerNorm(2D, eps 1e-5) -> exact GELU -> Linear(2D -> out)."""

  def __init__(self, width: int, out: int, ln_eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = L.Dense(
      (width,),
      (2 * width,),
      kernel_names=("embed", "mlp"),
      bias_names=("mlp",),
      kernel_init=L.torch_linear(width),
      bias_init=L.torch_linear(width),
      **kw,
    )
    self.norm = L.LayerNorm(2 * width, ln_eps, **kw)
    self.fc2 = L.Dense(
      (2 * width,),
      (out,),
      kernel_names=("mlp", "classes"),
      bias_names=("classes",),
      kernel_init=L.torch_linear(2 * width),
      bias_init=L.torch_linear(2 * width),
      **kw,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(L.gelu(self.norm(self.fc1(x)))).astype(jnp.float32)


class MlmHead(nnx.Module):
  """dense -> GELU -> LayerNorm -> h . W^T + bias, W the word embeddings (decoder tied) or, with
  `own_decoder` (the XVLMPlus `mlm_head`, docs/multilingual.md#layout), a matrix of its own."""

  def __init__(
    self,
    width: int,
    vocab_size: int,
    ln_eps: float,
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    own_decoder: bool = False,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.dense = L.Dense(
      (width,),
      (width,),
      kernel_names=("embed", "embed"),
      bias_names=("embed",),
      kernel_init=L.normal(0.02),
      **kw,
    )
    self.norm = L.LayerNorm(width, ln_eps, **kw)
    self.bias = L.param(rngs, L.zeros, (vocab_size,), ("vocab",), param_dtype)
    # BERT's _init_weights draws the untied decoder Linear N(0, 0.02), like the embeddings.
    self.decoder = (
      L.param(rngs, L.normal(0.02), (vocab_size, width), ("vocab", "embed"), param_dtype)
      if own_decoder
      else None
    )

  def __call__(self, h: jax.Array, word_embeddings: jax.Array | None = None) -> jax.Array:
    """h [B, M, D] (states at the predicted positions), word [V, D] (ignored with an own
    decoder) -> logits [B, M, V] f32."""
    if self.decoder is not None:
      word_embeddings = self.decoder[...]
    elif word_embeddings is None:
      raise ValueError("a tied MLM head needs the word embeddings")
    h = self.norm(L.gelu(self.dense(h)))
    logits = jnp.einsum("bmd,vd->bmv", h, word_embeddings.astype(self.dtype))
    return logits.astype(jnp.float32) + self.bias[...].astype(jnp.float32)
