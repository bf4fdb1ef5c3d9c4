"""BEiT-2 ViT vision tower as the official X2-VLM code configures it.

Official behaviour: docs/fidelity.md#beit-2-vision-tower.

16x16 conv patch embedding, a cls token and NO absolute position embedding (BEiT's optional one,
`VisionConfig.abs_pos_embed`, is off in every released model); pre-LN blocks with a
per-block relative position bias table, fused qkv (no key bias), layer scale and drop path; the
output is [mean of fc_norm(patch tokens), fc_norm(patch tokens)] -- BEiT's own CLS output is
dropped (docs/fidelity.md#vision-token-0-is-the-patch-mean).

The bias-table geometry is a pure function of the patch grid: `relative_position_index(grid)` and
`resize_rel_pos_bias(table, src_grid, dst_grid)` (the official interpolation,
docs/fidelity.md#relative-position-bias-resize, used when a 224-px checkpoint is converted to
384 px). The tower itself only runs at `config.image_size`.
"""

from __future__ import annotations

import functools

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2vlm_jax.models import layers as L
from x2vlm_jax.models.attention import attend
from x2vlm_jax.models.config import VisionConfig

# CLIP normalisation statistics, used by the official code even for the BEiT backbone
# (docs/fidelity.md#clip-normalisation).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# Relative position bias geometry.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _index(grid: int) -> np.ndarray:
  p = grid
  num_rel = (2 * p - 1) ** 2 + 3
  rows, cols = np.divmod(np.arange(p * p), p)  # token k -> (row, col), row-major (row = y)
  d_row = rows[:, None] - rows[None, :] + p - 1  # [T, T]
  d_col = cols[:, None] - cols[None, :] + p - 1
  idx = np.empty((p * p + 1, p * p + 1), np.int32)
  idx[1:, 1:] = d_row * (2 * p - 1) + d_col
  idx[0, :] = num_rel - 3  # CLS query -> patch keys
  idx[:, 0] = num_rel - 2  # patch queries -> CLS key
  idx[0, 0] = num_rel - 1  # CLS -> CLS
  idx.setflags(write=False)
  return idx


def relative_position_index(grid: int) -> np.ndarray:
  """[1+T, 1+T] int32 rows of the bias table for every (query, key) pair, T = grid^2.

  Patch-patch: (dr + P - 1)(2P - 1) + (dc + P - 1); CLS row num_rel-3, CLS column num_rel-2,
  CLS-CLS num_rel-1 (docs/fidelity.md#relative-position-bias).
  """
  return np.array(_index(int(grid)))


def _geometric_offsets(s: int, t: int) -> np.ndarray:
  """Source axis of the official resize: ratio q by bisection on [1.01, 1.5] to 1e-6 so that
  1 + q + ... + q^(s//2 - 1) ~ t//2, then offsets d_1 = 1, d_{k+1} = d_k + q^k, mirrored
  (docs/fidelity.md#relative-position-bias-resize)."""
  half_src, half_dst = s // 2, t // 2
  left, right, q = 1.01, 1.5, 1.01
  while right - left > 1e-6:
    q = (left + right) / 2.0
    gp = (1.0 - q**half_src) / (1.0 - q)
    if gp > half_dst:
      right = q
    else:
      left = q
  dis, cur = [], 1.0
  for k in range(half_src):
    dis.append(cur)
    cur += q ** (k + 1)
  return np.array([-d for d in reversed(dis)] + [0.0] + dis)


def resize_rel_pos_bias(table: np.ndarray, src_grid: int, dst_grid: int) -> np.ndarray:
  """Resizes one block's bias table [(2Ps-1)^2+3, H] -> [(2Pd-1)^2+3, H] as the official code.

  docs/fidelity.md#relative-position-bias-resize describes the algorithm.

  The 3 CLS rows are kept; each head's (2Ps-1)^2 grid is fitted with an interpolating bicubic
  spline over a geometrically spaced source axis and evaluated on the integer target axis
  (`RectBivariateSpline(kx=3, ky=3, s=0)`, the rectangular-grid equivalent of the official
  `interp2d(kind='cubic')`). Same grid -> the table is returned unchanged (the official code only
  interpolates when the sizes differ).
  """
  from scipy.interpolate import RectBivariateSpline

  table = np.asarray(table)
  s, t = 2 * src_grid - 1, 2 * dst_grid - 1
  if table.ndim != 2 or table.shape[0] != s * s + 3:
    raise ValueError(
      f"rel-pos table of shape {table.shape} does not fit a {src_grid}x{src_grid} "
      f"patch grid (expected [{s * s + 3}, heads])"
    )
  if src_grid == dst_grid:
    return table.copy()
  extra = table[-3:]
  axis = _geometric_offsets(s, t)
  target = np.arange(-(t // 2), t // 2 + 0.1, 1.0)
  heads = []
  for h in range(table.shape[1]):
    z = table[:-3, h].astype(np.float64).reshape(s, s)  # [d_row, d_col]
    spline = RectBivariateSpline(axis, axis, z, kx=3, ky=3, s=0)
    heads.append(spline(target, target).reshape(-1))  # row-major over (d_row, d_col)
  grid = np.stack(heads, axis=-1).astype(table.dtype)  # [t*t, H]
  return np.concatenate([grid, extra], axis=0)


def normalize_pixels(pixels: jax.Array, dtype) -> jax.Array:
  """uint8 [..., R, R, 3] -> (x/255 - CLIP mean) / CLIP std in `dtype` (done on device)."""
  x = pixels.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)
  return x.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------------------------


class VisionAttention(nnx.Module):
  """Multi-head self-attention with fused qkv, q/v biases (key bias fixed at 0) and a learned
  relative position bias table of this block."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention="einsum", rngs: nnx.Rngs):
    d, h = cfg.width, cfg.num_heads
    dh = d // h
    self.num_heads, self.head_dim, self.dtype, self.attention = h, dh, dtype, attention
    init = L.trunc_normal(0.02)
    self.qkv = L.Dense(
      (d,),
      (3, h, dh),
      kernel_names=("embed", "qkv", "heads", "kv"),
      bias_names=None,
      kernel_init=init,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.q_bias = L.param(rngs, L.zeros, (h, dh), ("heads", "kv"), param_dtype)
    self.v_bias = L.param(rngs, L.zeros, (h, dh), ("heads", "kv"), param_dtype)
    self.rel_pos_bias = L.param(rngs, L.zeros, (cfg.num_rel, h), ("rel_pos", "heads"), param_dtype)
    self.proj = L.Dense(
      (h, dh),
      (d,),
      kernel_names=("heads", "kv", "embed"),
      bias_names=("embed",),
      kernel_init=init,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array, rel_index: np.ndarray) -> jax.Array:
    qkv = self.qkv(x)  # [B, S, 3, H, dh]
    q = (qkv[:, :, 0] + self.q_bias[...].astype(self.dtype)) * (self.head_dim**-0.5)
    k = qkv[:, :, 1]  # key bias is the constant 0 of the official [q_bias, 0, v_bias]
    v = qkv[:, :, 2] + self.v_bias[...].astype(self.dtype)
    bias = self.rel_pos_bias[...].astype(jnp.float32)[rel_index]  # [S, S, H]
    bias = einops.rearrange(bias, "q k h -> 1 h q k")
    out = attend(q, k, v, bias, impl=self.attention)  # [B, S, H, dh]
    return self.proj(out)


class VisionBlock(nnx.Module):
  """Pre-LN block with layer scale: x + dp(g1 * attn(ln1 x)); then + dp(g2 * mlp(ln2 x))."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention="einsum", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = L.LayerNorm(cfg.width, cfg.ln_eps, **kw)
    self.attn = VisionAttention(cfg, attention=attention, **kw)
    self.norm2 = L.LayerNorm(cfg.width, cfg.ln_eps, **kw)
    self.mlp = L.Mlp(cfg.width, cfg.mlp_dim, kernel_init=L.trunc_normal(0.02), **kw)
    self.gamma_1 = L.param(
      rngs, L.constant(cfg.layer_scale_init), (cfg.width,), ("embed",), param_dtype
    )
    self.gamma_2 = L.param(
      rngs, L.constant(cfg.layer_scale_init), (cfg.width,), ("embed",), param_dtype
    )
    self.dtype = dtype

  def __call__(self, x, rel_index, rate, keys, deterministic: bool):
    k1, k2 = (None, None) if deterministic else (keys[0], keys[1])
    h = self.attn(self.norm1(x), rel_index) * self.gamma_1[...].astype(self.dtype)
    x = x + L.drop_path(h, rate, k1)
    h = self.mlp(self.norm2(x)) * self.gamma_2[...].astype(self.dtype)
    x = x + L.drop_path(h, rate, k2)
    return L.constrain(x, L.ACT)


def sincos_2d(grid: int, width: int) -> np.ndarray:
  """float32 [1 + grid^2, width]: a zero row for the cls slot, then per patch (row-major, row = y)
  sin/cos of its x in the first half of the channels and of its y in the second half, at
  width/4 frequencies 1/10000^(k / (width/4)) (MAE's fixed embedding)."""
  if width % 4:
    raise ValueError(f"a 2-D sine-cosine position embedding needs width % 4 == 0, got {width}")
  freqs = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))  # [D/4]
  y, x = np.mgrid[0:grid, 0:grid].reshape(2, -1).astype(np.float64)  # [T] each
  half = lambda pos: np.concatenate([np.sin(pos[:, None] * freqs), np.cos(pos[:, None] * freqs)], 1)
  table = np.concatenate([half(x), half(y)], axis=1)  # [T, D]
  return np.concatenate([np.zeros((1, width)), table], axis=0).astype(np.float32)


def sincos_init(grid: int) -> L.Init:
  """Initialiser of a [1, 1 + grid^2, D] absolute position embedding with `sincos_2d`."""

  def init(key, shape, dtype):
    del key
    return jnp.asarray(sincos_2d(grid, shape[-1])[None], dtype)

  init.deterministic = True
  return init


class VisionTower(nnx.Module):
  """BEiT-2 ViT: normalised images [N, R, R, 3] -> [N, 1+T, D] = [patch mean, patches]."""

  def __init__(
    self,
    cfg: VisionConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool | str = False,
    unroll: int | bool = 1,
    attention: str = "einsum",
    rngs: nnx.Rngs,
  ):
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch {cfg.patch_size}")
    if cfg.width % cfg.num_heads:
      raise ValueError(f"vision width {cfg.width} is not divisible by {cfg.num_heads} heads")
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    self.unroll = unroll  # layers per scan iteration (ModelConfig.scan_unroll)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    p, d = cfg.patch_size, cfg.width
    init = L.trunc_normal(0.02)
    # The 16x16/16 conv is a dense layer on non-overlapping patches flattened as (kH, kW, C).
    self.patch_embed = L.Dense(
      (p, p, 3),
      (d,),
      kernel_names=("patch", "patch", "patch", "embed"),
      bias_names=("embed",),
      kernel_init=init,
      rngs=rngs,
      **kw,
    )
    self.cls_token = L.param(rngs, init, (1, 1, d), (None, None, "embed"), param_dtype)
    pos_init = {"trunc_normal": init, "sincos": sincos_init(cfg.grid)}.get(cfg.pos_embed_init)
    if pos_init is None:
      raise ValueError(
        f"VisionConfig.pos_embed_init must be 'trunc_normal' or 'sincos', got "
        f"{cfg.pos_embed_init!r}"
      )
    self.pos_embed = (
      L.param(rngs, pos_init, (1, 1 + cfg.num_patches, d), (None, None, "embed"), param_dtype)
      if cfg.abs_pos_embed
      else None
    )
    self.blocks = L.stacked(
      lambda r: VisionBlock(cfg, attention=attention, rngs=r, **kw), cfg.depth, rngs
    )
    # fix_init_weight: proj and fc2 of block i divided by sqrt(2 (i + 1))
    # (docs/fidelity.md#vision-initialisation).
    scale = L.depth_scale(cfg.depth)
    for dense in (self.blocks.attn.proj, self.blocks.mlp.fc2):
      w = dense.kernel[...]
      dense.kernel[...] = w * jnp.asarray(scale, w.dtype).reshape((-1,) + (1,) * (w.ndim - 1))
    self.fc_norm = L.LayerNorm(d, cfg.ln_eps, rngs=rngs, **kw)

  def patchify(self, images: jax.Array) -> jax.Array:
    """[N, R, R, 3] -> [N, T, p, p, 3], patches in row-major grid order (row = y)."""
    p = self.cfg.patch_size  # the grid sizes gy = gx = R / p follow from the shape
    return einops.rearrange(images, "n (gy py) (gx px) c -> n (gy gx) py px c", py=p, px=p)

  def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(
        f"vision tower expects images [N, {cfg.image_size}, {cfg.image_size}, 3], "
        f"got {images.shape}; a table trained at another resolution must be "
        "converted with resize_rel_pos_bias first"
      )
    n = images.shape[0]
    x = self.patch_embed(self.patchify(images.astype(self.dtype)))  # [N, T, D]
    cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1)  # [N, 1+T, D]
    if self.pos_embed is not None:  # absent in the released models (docs/fidelity.md#demo-model)
      x = x + self.pos_embed[...].astype(self.dtype)
    x = L.constrain(x, L.ACT)
    rel_index = relative_position_index(cfg.grid)
    deterministic = key is None
    rates = jnp.asarray(np.linspace(0.0, cfg.drop_path_rate, cfg.depth), jnp.float32)
    keys = L.layer_keys(key, cfg.depth, 2)

    def body(block, h, xs):
      rate, ks = xs
      return block(h, rel_index, rate, ks, deterministic)

    x = L.scan_layers(self.blocks, body, x, (rates, keys), remat=self.remat, unroll=self.unroll)
    patches = self.fc_norm(x[:, 1:])  # [N, T, D]; BEiT's CLS output is discarded
    mean = jnp.mean(patches.astype(jnp.float32), axis=1, keepdims=True).astype(patches.dtype)
    return L.constrain(jnp.concatenate([mean, patches], axis=1), L.ACT)  # [N, 1+T, D]
