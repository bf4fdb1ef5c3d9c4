"""The attention core with a selectable implementation (`ModelConfig.attention`).

  "einsum"  our own two einsums and a float32 softmax (`layers.dot_attention`); the default and
            the only one that applies attention-probability dropout.
  "xla"     `jax.nn.dot_product_attention(implementation="xla")`: the same computation written by
            JAX (float32 logits and softmax, probabilities cast back to the value dtype).
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused (flash)
            kernel, used only where it can run (below), else "xla".

Additive biases (the vision tower's relative position bias, the padding biases of text and
cross-attention, captioning's per-example masks) are passed to `dot_product_attention` as its
`bias`, unchanged, so every implementation adds exactly the same numbers to the logits.

What falls back, and why (one log line per distinct case, at trace time):
- dropout on the probabilities is active (a key and a rate > 0: the text and fusion towers in
  training): `dot_product_attention` has no dropout, so "xla" and "cudnn" use "einsum" there;
- "cudnn" off a GPU, with float32 inputs (cuDNN's fused attention takes fp16 / bf16 only), with a
  head dim that is not a multiple of 8 or above 128, or with a bias and an odd query or key
  length (cuDNN's bias gradient needs even lengths: the vision tower's 1 + 196 tokens at 224 px):
  "xla".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from x2vlm_jax.models import layers as L

IMPLS = ("einsum", "xla", "cudnn")
_LOGGED: set[tuple[str, str]] = set()


def check_impl(impl: str) -> str:
  """`impl` if it names an implementation, else a ValueError listing them."""
  if impl not in IMPLS:
    raise ValueError(f"attention implementation {impl!r} is not one of {IMPLS}")
  return impl


def cudnn_obstacle(q: jax.Array, k: jax.Array, bias: jax.Array | None, backend: str) -> str:
  """Why cuDNN's fused attention cannot take these inputs ('' = it can)."""
  length, keys, dh = q.shape[1], k.shape[1], q.shape[-1]
  if backend != "gpu":
    return f"backend is {backend}, not gpu"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"inputs are {jnp.dtype(q.dtype).name}; cuDNN fused attention takes bf16 / fp16"
  if dh % 8 or dh > 128:
    return f"head dim {dh} is not a multiple of 8 up to 128"
  if bias is not None and (length % 2 or keys % 2):
    return f"a bias with odd query / key lengths ({length}, {keys})"
  return ""


def resolve(
  impl: str, q: jax.Array, k: jax.Array, bias: jax.Array | None, dropout: bool, backend: str
) -> tuple[str, str]:
  """(implementation that will run, reason for a fallback or '')."""
  check_impl(impl)
  if impl != "einsum" and dropout:
    return "einsum", "attention-probability dropout is active (dot_product_attention has none)"
  if impl == "cudnn":
    why = cudnn_obstacle(q, k, bias, backend)
    if why:
      return "xla", why
  return impl, ""


def attend(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  bias: jax.Array | None,
  *,
  impl: str = "einsum",
  dropout_rate: float = 0.0,
  key: jax.Array | None = None,
) -> jax.Array:
  """softmax(q.k^T + bias) . v by `impl`; q already scaled. q [B, L, H, dh], k/v [B, S, H, dh],
  bias broadcastable to [B, H, L, S] (float32) -> [B, L, H, dh] in v's dtype."""
  dropout = key is not None and dropout_rate > 0.0
  used, why = resolve(impl, q, k, bias, dropout, jax.default_backend())
  if why and (impl, why) not in _LOGGED:
    _LOGGED.add((impl, why))
    logging.info("attention %r falls back to %r: %s", impl, used, why)
  if used == "einsum":
    core = lambda q, k, v, bias, key: L.dot_attention(
      q, k, v, bias, dropout_rate=dropout_rate, key=key
    )
  else:
    if bias is not None and used == "cudnn":
      # cuDNN wants the bias in the inputs' dtype and with the full query / key lengths.
      b, h = bias.shape[0], bias.shape[1]
      bias = jnp.broadcast_to(bias, (b, h, q.shape[1], k.shape[1])).astype(q.dtype)
    core = lambda q, k, v, bias, key: jax.nn.dot_product_attention(
      q, k, v, bias=bias, scale=1.0, implementation=used
    )
  if L.recompute_attention():  # remat policy "save_all_but_attention": keep only the inputs
    core = jax.checkpoint(core, policy=jax.checkpoint_policies.nothing_saveable)
  return core(q, k, v, bias, key)
