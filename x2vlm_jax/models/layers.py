"""Building blocks shared by the towers: parameters with logical names, dense layers with an
explicit head axis, float32 LayerNorm, attention, MLP, dropout and drop path.

Every parameter is created through `param`, which attaches the logical axis names of
docs/architecture.md (resolved to mesh axes in `x2vlm_jax.sharding`). Eager sharding is switched
off while a parameter is born: placement is decided once, by `jax.jit(..., out_shardings=...)`
over the whole state (see `x2vlm.create_sharded`), so building a model never needs a mesh.

Randomness is explicit: a function that can drop something takes `key`, and `key=None` means
deterministic (evaluation).
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2vlm_jax import sharding

Init = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
Names = tuple[str | None, ...]


# ---------------------------------------------------------------------------------------------
# Initialisers (docs/fidelity.md#vision-initialisation, docs/fidelity.md#head-initialisation).
# ---------------------------------------------------------------------------------------------


def normal(std: float) -> Init:
  """N(0, std^2): BERT weights and embeddings (initializer_range 0.02)."""
  return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def trunc_normal(std: float, bound: float = 2.0) -> Init:
  """timm `trunc_normal_(std=std)`: N(0, std^2) cut at +-`bound` in *absolute* units (timm's
  defaults a=-2, b=2), i.e. practically untruncated for std 0.02 (BEiT weights, cls token)."""

  def init(key, shape, dtype):
    x = jax.random.truncated_normal(key, -bound / std, bound / std, shape, jnp.float32)
    return (std * x).astype(dtype)

  return init


def torch_linear(fan_in: int) -> Init:
  """PyTorch's default nn.Linear init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  (kaiming_uniform with a=sqrt(5) reduces to this bound). Used by the heads."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype: jax.random.uniform(
    key, shape, jnp.float32, -bound, bound
  ).astype(dtype)


def constant(value: float) -> Init:
  """Every entry equal to `value` (layer-scale gammas, temperature, LayerNorm scale)."""

  def init(key, shape, dtype):
    del key
    return jnp.full(shape, value, dtype)

  init.deterministic = True  # `param` draws no key for it (fewer PRNG ops to compile)
  return init


zeros = constant(0.0)
ones = constant(1.0)


def param(rngs: nnx.Rngs, init: Init, shape: Sequence[int], names: Names, dtype: Any) -> nnx.Param:
  """A parameter annotated with logical axis names (`nnx.with_partitioning`), born unsharded."""
  shape = tuple(int(s) for s in shape)
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match parameter shape {shape}")
  key = None if getattr(init, "deterministic", False) else rngs.params()
  with nnx.use_eager_sharding(False):
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(key, shape, dtype))


# ---------------------------------------------------------------------------------------------
# Activation sharding.
# ---------------------------------------------------------------------------------------------


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """Sharding constraint by logical names; a no-op unless a ('data','fsdp','tensor') mesh is set
  as the ambient mesh (`jax.set_mesh`), so models also run on a bare device without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or set(mesh.axis_names) != set(sharding.MESH_AXES):
    return x
  spec = sharding.logical_to_spec(names, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


ACT = ("batch", "seq", "act_embed")  # [B, S, D] activations at block boundaries


# ---------------------------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------------------------


class Dense(nnx.Module):
  """y = x . W + b, contracting the last len(in_shape) axes of x with the first axes of W.

  W has shape in_shape + out_shape so attention projections keep an explicit head axis
  (`[D, H, dh]`, `[H, dh, D]`); the bias has shape out_shape.
  """

  def __init__(
    self,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    *,
    kernel_names: Names,
    bias_names: Names | None,
    kernel_init: Init,
    bias_init: Init = zeros,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.in_ndim = len(in_shape)
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, (*in_shape, *out_shape), kernel_names, param_dtype)
    self.bias = (
      param(rngs, bias_init, tuple(out_shape), bias_names, param_dtype)
      if bias_names is not None
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel[...].astype(self.dtype)
    y = jnp.tensordot(x.astype(self.dtype), k, axes=self.in_ndim)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm whose statistics are always float32 (even in bfloat16 mode); output in `dtype`."""

  def __init__(
    self,
    dim: int,
    eps: float,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, ones, (dim,), ("norm",), param_dtype)
    self.bias = param(rngs, zeros, (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)  # biased, as torch
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU everywhere, as nn.GELU / BERT "gelu" (docs/fidelity.md#exact-gelu).

  Its gradient is written out so that the backward pass keeps only the input: differentiating
  the formula keeps several intermediates of the widest activation of every layer (the MLP's
  [B, S, 4 x width]), which the layer scans store in stacked buffers (zero-filled and copied on
  CPU). Same values; gradients equal to float rounding (tests/test_models_gelu.py). 8-10 %
  faster on the op-bound official-tiny CPU step (docs/benchmarks.md#cpu-tuning).
  """
  return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
  return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2 (no dropout inside; callers add it where BERT has it)."""

  def __init__(
    self,
    dim: int,
    hidden: int,
    *,
    kernel_init: Init,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
    fc2_init: Init | None = None,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Dense(
      (dim,),
      (hidden,),
      kernel_names=("embed", "mlp"),
      bias_names=("mlp",),
      kernel_init=kernel_init,
      **kw,
    )
    self.fc2 = Dense(
      (hidden,),
      (dim,),
      kernel_names=("mlp", "embed"),
      bias_names=("embed",),
      kernel_init=fc2_init or kernel_init,
      **kw,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu(self.fc1(x)))


# ---------------------------------------------------------------------------------------------
# Functional pieces: attention, masks, dropout, drop path.
# ---------------------------------------------------------------------------------------------


def padding_bias(mask: jax.Array, value: float) -> jax.Array:
  """Key mask [B, S] (1 = attend) -> additive bias [B, 1, 1, S] = (1 - mask) * value, float32.

  BERT uses value -10000 for text self-attention and transformers 4.12's -1e9 for
  cross-attention (docs/fidelity.md#attention-mask-values)."""
  return ((1.0 - mask.astype(jnp.float32)) * value)[:, None, None, :]


def attention_bias(mask: jax.Array, value: float) -> jax.Array:
  """A key mask [B, S] -> `padding_bias` [B, 1, 1, S]; a per-example attention mask [B, L, S]
  (row = query, 1 = attend; the captioning task's UniLM-style masks) -> [B, 1, L, S]."""
  if mask.ndim == 3:
    return ((1.0 - mask.astype(jnp.float32)) * value)[:, None]
  return padding_bias(mask, value)


def causal_bias(mask: jax.Array, value: float) -> jax.Array:
  """Key mask [B, L] -> additive bias [B, 1, L, L] of a decoder's self-attention: query i sees
  the real keys j <= i, as BERT's decoder mask (causal x padding, then (1 - m) * value)."""
  length = mask.shape[1]
  causal = jnp.tril(jnp.ones((length, length), jnp.float32))  # [L, L], row = query
  keep = causal[None] * mask.astype(jnp.float32)[:, None, :]  # [B, L, L]
  return ((1.0 - keep) * value)[:, None]


def dot_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  bias: jax.Array | None,
  *,
  dropout_rate: float = 0.0,
  key: jax.Array | None = None,
) -> jax.Array:
  """softmax(q.k^T + bias) . v with float32 logits/softmax; q must already be scaled.

  q [B, L, H, dh], k/v [B, S, H, dh], bias broadcastable to [B, H, L, S] -> [B, L, H, dh].
  Dropout on the probabilities only when `key` is given (BERT attention_probs_dropout).
  """
  # float32 logits straight out of the matmul (bf16 inputs accumulate and round into float32).
  logits = jnp.einsum("blhd,bshd->bhls", q, k, preferred_element_type=jnp.float32)  # [B, H, L, S]
  if bias is not None and bias.shape[0] == 1 < logits.shape[0] and bias.ndim == logits.ndim:
    logits = add_shared_bias(logits, jnp.broadcast_to(bias, (1, *logits.shape[1:])))
  elif bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1)
  probs = dropout(probs, dropout_rate, key)
  return jnp.einsum("bhls,bshd->blhd", probs.astype(v.dtype), v)


@jax.custom_vjp
def add_shared_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """x [B, ...] + bias [1, ...] (one bias shared by the batch: the vision tower's relative
  position bias [1, H, S, S]). Same value as `x + bias`; the bias gradient, the sum of x's
  gradient over the batch, is computed as a ones-vector matmul instead of a reduction over the
  leading axis, which XLA CPU runs ~100x slower (measured on [8, 12, 197, 197], 2026-12-02, same
  process: 101-125 ms vs 0.8-1.6 ms; docs/benchmarks.md). Full float32 precision (no TF32)."""
  return x + bias


def _add_shared_bias_fwd(x, bias):
  return x + bias, None


def _add_shared_bias_bwd(_, g):
  n = g.shape[0]
  ones = jnp.ones((n,), g.dtype)
  db = jnp.einsum("b,bx->x", ones, g.reshape(n, -1), precision=jax.lax.Precision.HIGHEST)
  return g, db.reshape((1, *g.shape[1:]))


add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout (kept entries scaled by 1/(1-rate)); identity when key is None or rate 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def drop_path(x: jax.Array, rate: jax.Array | float, key: jax.Array | None) -> jax.Array:
  """timm-style stochastic depth: one Bernoulli(1-rate) per sample, kept samples scaled by
  1/(1-rate) (docs/fidelity.md#stochastic-depth). `rate` may be traced (per-layer rates are scan
  inputs)."""
  if key is None:
    return x
  keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
  keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return (x * (keep.astype(jnp.float32) / keep_prob)).astype(x.dtype)


def drop_positions(x: jax.Array, rate: jax.Array | float, key: jax.Array | None) -> jax.Array:
  """Drop path of the official BERT layers (docs/fidelity.md#text-drop-path): x [B, L, ...] gets
  one Bernoulli(1-rate) per token position, shared by every row of the batch (mask [1, L, 1]),
  kept positions scaled by 1/(1-rate). Identity when key is None; `rate` may be traced (per-layer
  rates are scan inputs), and rate 0 keeps everything unchanged."""
  if key is None:
    return x
  keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
  keep = jax.random.bernoulli(key, keep_prob, (1, x.shape[1]) + (1,) * (x.ndim - 2))
  return (x * (keep.astype(jnp.float32) / keep_prob)).astype(x.dtype)


def path_rates(rate: float, depth: int) -> np.ndarray:
  """Per-layer BERT drop-path rates: linspace(0, rate, depth) as float32, rates <= 1e-3 set to 0
  (the official layers only build a drop path above that threshold)."""
  rates = np.linspace(0.0, rate, depth)
  return np.where(rates > 1e-3, rates, 0.0).astype(np.float32)


def layer_keys(key: jax.Array | None, depth: int, per_layer: int) -> jax.Array:
  """Keys for a scanned tower: [depth, per_layer] typed keys (dummy ones when key is None, in
  which case the per-layer bodies are called with `deterministic=True` and never read them)."""
  base = jax.random.key(0) if key is None else key
  if not jnp.issubdtype(base.dtype, jax.dtypes.prng_key):
    base = jax.random.wrap_key_data(base)
  return jax.random.split(base, (depth, per_layer))


def stacked(make: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs) -> nnx.Module:
  """Creates `depth` copies of a layer with `nnx.vmap`, every parameter stacked on a leading
  axis whose logical name is 'layers' (the scanned-tower layout of docs/architecture.md)."""
  keys = jax.random.split(rngs.params(), depth)

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(k):
    return make(nnx.Rngs(params=k))

  return create(keys)


# Rematerialisation policies of a scanned tower (`ModelConfig.remat`, per tower `remat_*`):
#   none          keep every activation of every layer for the backward pass;
#   full          keep only each layer's input, recompute the rest (`nnx.remat`);
#   save_matmuls  keep the outputs of the weight matmuls (no batch dims: projections and MLP),
#                 recompute the cheap element-wise work and the attention core (its [B, H, L, S]
#                 logits and probabilities are not saved);
#   save_dots     keep the outputs of every matmul, attention's batched ones included;
#   save_all_but_attention  no remat of the layer, but the attention core (softmax(q.k + bias).v)
#                 keeps only its inputs: its [B, H, L, S] logits and probabilities are recomputed
#                 (`recompute_attention`). A checkpoint-name policy cannot do this: softmax's own
#                 residuals are unnamed intermediates.
REMAT_POLICIES = {
  "none": None,
  "full": None,
  "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "save_dots": jax.checkpoint_policies.dots_saveable,
  "save_all_but_attention": None,
}
# Set while a tower with "save_all_but_attention" is traced; read by `attention.attend`.
_RECOMPUTE_ATTENTION = contextvars.ContextVar("recompute_attention", default=False)


def recompute_attention() -> bool:
  """Whether the attention core being traced should keep only its inputs for the backward."""
  return _RECOMPUTE_ATTENTION.get()


def remat_name(remat: bool | str) -> str:
  """A remat setting (bool as before: False = none, True = full, or a policy name) -> its name."""
  if isinstance(remat, (bool, np.bool_)):
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat policy {remat!r} is not one of {sorted(REMAT_POLICIES)} or a bool")
  return remat


def scan_layers(
  layers: nnx.Module,
  body: Callable,
  x: jax.Array,
  xs: Any,
  *,
  remat: bool | str = False,
  unroll: int | bool = 1,
) -> jax.Array:
  """Runs `x = body(layer_i, x, xs_i)` over a stacked module with `nnx.scan`.

  xs: pytree of per-layer inputs with a leading depth axis (drop-path rates, dropout keys,
  precomputed cross-attention K/V). `remat`: a `REMAT_POLICIES` name (or a bool: True = full)
  saying what each layer keeps for the backward pass; the numbers are the same for all.
  `unroll`: layers per loop iteration (`lax.scan`'s unroll; True = no loop), same numbers.
  """
  name = remat_name(remat)
  plain = name in ("none", "save_all_but_attention")
  fn = body if plain else nnx.remat(body, policy=REMAT_POLICIES[name])
  scan = nnx.scan(
    fn,
    unroll=unroll,
    in_axes=(0, nnx.Carry, 0),
    out_axes=nnx.Carry,
    transform_metadata={nnx.PARTITION_NAME: "layers"},
  )
  token = _RECOMPUTE_ATTENTION.set(name == "save_all_but_attention")
  try:  # the body is traced inside this call
    return scan(layers, x, xs)
  finally:
    _RECOMPUTE_ATTENTION.reset(token)


def depth_scale(depth: int) -> np.ndarray:
  """1/sqrt(2(i+1)) per layer i: BEiT's `fix_init_weight` rescaling of attn.proj and mlp.fc2."""
  return 1.0 / np.sqrt(2.0 * (np.arange(depth) + 1.0))
