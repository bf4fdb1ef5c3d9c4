"""The X2-VLM model: vision, text and fusion towers plus heads. Computes features, never losses.

API (docs/architecture.md): `encode_image`, `encode_video`, `concepts`, `encode_text`,
`vision_kv`, `fuse`, `itc_features`, `itm_logits`, `box`, `mlm_logits`, `temperature`; with the
optional fine-tuning heads `answer_logits` / `question_kv` (VQA decoder) and `cls_logits`.
Randomness (dropout, drop path) only through an explicit `key`; `key=None` is deterministic.

`create_sharded` builds the parameters directly in their final sharding (one jitted constructor
with `out_shardings`), `abstract_model` / `count_params` work without allocating anything.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from x2vlm_jax import sharding
from x2vlm_jax.models import layers as L
from x2vlm_jax.models.attention import check_impl
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.decoder import TextDecoder
from x2vlm_jax.models.fusion import FusionTower, VisionKV
from x2vlm_jax.models.heads import MlmHead, MlpHead, Projection
from x2vlm_jax.models.text import TextTower
from x2vlm_jax.models.vision import VisionTower, normalize_pixels


class X2VLM(nnx.Module):
  """X2-VLM: BEiT-2 vision tower, BERT (or XLM-R) text tower, fusion tower and heads.

  Official architecture: docs/fidelity.md#architecture.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.text.width % cfg.fusion.num_heads:
      raise ValueError(
        f"fusion heads {cfg.fusion.num_heads} do not divide text width {cfg.text.width}"
      )
    self.cfg = cfg
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    dv, dt = cfg.vision.width, cfg.text.width
    remat = {t: L.remat_name(cfg.tower_remat(t)) for t in ("vision", "text", "fusion")}
    att = dict(attention=check_impl(cfg.attention), unroll=cfg.scan_unroll, rngs=rngs, **kw)
    self.vision = VisionTower(cfg.vision, remat=remat["vision"], **att)
    self.text = TextTower(cfg.text, remat=remat["text"], **att)
    self.fusion = FusionTower(cfg.fusion, cfg.text, dv, remat=remat["fusion"], **att)
    self.vision_proj = Projection(dv, cfg.embed_dim, rngs=rngs, **kw)
    self.text_proj = Projection(dt, cfg.embed_dim, rngs=rngs, **kw)
    self.temp = L.param(rngs, L.constant(cfg.temp_init), (), (), cfg.param_dtype)
    self.itm_head = MlpHead(dt, 2, cfg.head_ln_eps, rngs=rngs, **kw)
    self.box_head = MlpHead(dt, 4, cfg.head_ln_eps, rngs=rngs, **kw)
    # XVLMPlus: BertOnlyMLMHead(text config) with its own decoder (docs/multilingual.md#layout).
    self.mlm_head = MlmHead(
      dt, cfg.text.vocab_size, cfg.text.ln_eps, own_decoder=cfg.xvlm_plus, rngs=rngs, **kw
    )
    if cfg.frame_len > 0:
      self.frame_embed = L.param(
        rngs, L.trunc_normal(0.02), (cfg.frame_len, dv), ("frames", "embed"), cfg.param_dtype
      )
    else:
      self.frame_embed = None
    # Fine-tuning heads last, so the parameters above draw the same initial values with or
    # without them (docs/finetuning.md).
    self.text_decoder = (
      TextDecoder(cfg, remat=remat["fusion"], rngs=rngs, **kw) if cfg.decoder_layers > 0 else None
    )
    self.cls_head = (
      MlpHead(cfg.cls_inputs * dt, cfg.cls_labels, cfg.head_ln_eps, rngs=rngs, **kw)
      if cfg.cls_labels > 0
      else None
    )

  # -- vision ----------------------------------------------------------------------------------

  def encode_image(self, pixels: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """uint8 [N, R, R, 3] -> [N, 1+T, Dv]; token 0 = mean of the fc_norm'ed patch tokens."""
    r = self.cfg.vision.image_size
    if pixels.dtype != jnp.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (r, r, 3):
      raise ValueError(
        f"pixels must be uint8 [N, {r}, {r}, 3], got {pixels.dtype} {tuple(pixels.shape)}"
      )
    return self.vision(normalize_pixels(pixels, self.cfg.dtype), key)

  def encode_video(
    self, frames: jax.Array, frame_valid: jax.Array | None = None, key: jax.Array | None = None
  ) -> jax.Array:
    """uint8 [B, F, R, R, 3] (+ frame_valid [B, F]) -> [B, 1+T, Dv].

    Official behaviour: docs/fidelity.md#video-frame-embedding.

    Every frame goes through the vision tower; the learned frame embedding e_f is added to all
    tokens of frame f *after* the tower; the result is averaged over the valid frames (all
    frames when frame_valid is None, i.e. the official mean). A row without any valid frame
    gives zeros instead of NaN.
    """
    if frames.ndim != 5:
      raise ValueError(f"frames must be uint8 [B, F, R, R, 3], got {tuple(frames.shape)}")
    b, f = frames.shape[:2]
    x = self.encode_image(frames.reshape((b * f,) + frames.shape[2:]), key)
    return self.pool_frames(x.reshape((b, f) + x.shape[1:]), frame_valid)

  def pool_frames(self, frame_tokens: jax.Array, frame_valid: jax.Array | None = None) -> jax.Array:
    """Per-frame tower outputs [B, F, 1+T, Dv] -> clip tokens [B, 1+T, Dv].

    Official behaviour: docs/fidelity.md#video-frame-embedding.

    The second half of `encode_video`, public so that a train step can run the frames of a
    video batch through one shared vision-tower call with its images.
    """
    b, f = frame_tokens.shape[:2]
    if self.frame_embed is not None and f != self.cfg.frame_len:
      raise ValueError(
        f"frames has {f} frames but the model's frame embedding has frame_len {self.cfg.frame_len}"
      )
    if frame_valid is not None and frame_valid.shape != (b, f):
      raise ValueError(f"frame_valid must be [B={b}, F={f}], got {tuple(frame_valid.shape)}")
    x = frame_tokens.astype(jnp.float32)  # [B, F, 1+T, Dv]
    if self.frame_embed is not None:
      x = x + self.frame_embed[...].astype(jnp.float32)[None, :, None, :]
    if frame_valid is None:
      out = jnp.mean(x, axis=1)
    else:
      w = frame_valid.astype(jnp.float32)[:, :, None, None]  # [B, F, 1, 1]
      out = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return L.constrain(out.astype(self.cfg.dtype), L.ACT)

  @staticmethod
  def concepts(
    image_tokens: jax.Array, patch_mask: jax.Array, image_index: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """Region/object concepts without re-encoding (docs/fidelity.md#region-concepts).

    image_tokens [N, 1+T, D], patch_mask [B, T] (1 = patch inside the box), image_index [B] ->
    (concept tokens [B, 1+T, D] = [mean of in-box patches, all T patches of the image],
     mask [B, 1+T] = [1, patch_mask]). An empty box gives a zero token 0 instead of NaN.
    """
    s = image_tokens.shape[1]
    b = image_index.shape[0]
    if patch_mask.shape != (b, s - 1):
      raise ValueError(f"patch_mask must be [B={b}, T={s - 1}], got {tuple(patch_mask.shape)}")
    patches = jnp.take(image_tokens[:, 1:], image_index, axis=0)  # [B, T, D]
    w = patch_mask.astype(jnp.float32)[:, :, None]  # [B, T, 1]
    token = jnp.sum(patches.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    tokens = jnp.concatenate([token[:, None].astype(patches.dtype), patches], axis=1)
    mask = jnp.concatenate([jnp.ones((b, 1), patch_mask.dtype), patch_mask], axis=1)
    return tokens, mask

  # -- text and fusion -------------------------------------------------------------------------

  def encode_text(
    self,
    ids: jax.Array,
    mask: jax.Array,
    key: jax.Array | None = None,
    positions: jax.Array | None = None,
  ) -> jax.Array:
    """ids [B, L], mask [B, L] (or an attention mask [B, L, L], row = query), positions [B, L]
    (default 0..L-1) -> [B, L, Dt] (text layers only; the official `text` mode)."""
    return self.text(ids, mask, key, positions)

  def vision_kv(self, vision_tokens: jax.Array) -> VisionKV:
    """[N, S, Dv] -> every fusion layer's cross-attention K/V, [layers, N, S, H, dh] each."""
    return self.fusion.vision_kv(vision_tokens)

  def fuse(
    self,
    text: jax.Array,
    text_mask: jax.Array,
    vision: jax.Array | VisionKV,
    vision_mask: jax.Array,
    kv_index: jax.Array | None = None,
    key: jax.Array | None = None,
  ) -> jax.Array:
    """Fusion layers: text [B, L, Dt] attends to vision tokens [N, S, Dv] or their VisionKV;
    vision_mask [B, S]; kv_index [B] selects each text's vision row -> [B, L, Dt]."""
    return self.fusion(text, text_mask, vision, vision_mask, kv_index, key)

  # -- heads -----------------------------------------------------------------------------------

  def itc_features(
    self, vision_tokens: jax.Array, text_tokens: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """L2-normalised ITC features from token 0: ([N, E], [B, E]) float32."""
    return self.vision_proj(vision_tokens[:, 0]), self.text_proj(text_tokens[:, 0])

  def itm_logits(self, fused: jax.Array) -> jax.Array:
    """[B, L, Dt] -> [B, 2] logits (class 1 = match) from fused token 0."""
    return self.itm_head(fused[:, 0])

  def box(self, fused: jax.Array) -> jax.Array:
    """[B, L, Dt] -> [B, 4] sigmoid (cx, cy, w, h) from fused token 0."""
    return jax.nn.sigmoid(self.box_head(fused[:, 0]))

  def mlm_logits(self, fused: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, L, Dt], positions [B, M] -> [B, M, V]; evaluated only at the given positions."""
    if positions.ndim != 2 or positions.shape[0] != fused.shape[0]:
      raise ValueError(f"positions must be [B={fused.shape[0]}, M], got {tuple(positions.shape)}")
    h = jnp.take_along_axis(fused, positions[:, :, None].astype(jnp.int32), axis=1)  # [B, M, Dt]
    return self.mlm_head(h, self.text.embeddings.word[...])

  # -- fine-tuning heads (present only when configured) -----------------------------------------

  def answer_logits(
    self,
    ids: jax.Array,
    mask: jax.Array,
    question: jax.Array | VisionKV,
    question_mask: jax.Array,
    q_index: jax.Array | None = None,
    key: jax.Array | None = None,
  ) -> jax.Array:
    """VQA decoder: answer ids / mask [N, La] attending to fused question states [Nq, Lq, Dt]
    (or `question_kv`), question_mask [N, Lq], q_index [N] -> next-token logits [N, La, V]."""
    if self.text_decoder is None:
      raise ValueError("this model has no answer decoder (ModelConfig.decoder_layers = 0)")
    return self.text_decoder.logits(ids, mask, question, question_mask, q_index, key)

  def question_kv(self, question: jax.Array) -> VisionKV:
    """Fused question states [Nq, Lq, Dt] -> the decoder layers' cross-attention K/V."""
    if self.text_decoder is None:
      raise ValueError("this model has no answer decoder (ModelConfig.decoder_layers = 0)")
    return self.text_decoder.question_kv(question)

  def cls_logits(self, cls: jax.Array) -> jax.Array:
    """`cls_head` on fused [CLS] vectors [B, cls_inputs * Dt] -> float32 logits [B, C]."""
    if self.cls_head is None:
      raise ValueError("this model has no cls_head (ModelConfig.cls_labels = 0)")
    return self.cls_head(cls)


# -- construction helpers ----------------------------------------------------------------------


def abstract_model(cfg: ModelConfig) -> X2VLM:
  """The model with ShapeDtypeStruct leaves (nnx.eval_shape): nothing is allocated."""
  return nnx.eval_shape(lambda: X2VLM(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> int:
  """Number of learned parameters (buffers and the tied decoder are not parameters)."""
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return sum(math.prod(v.shape) for v in jax.tree.leaves(state))


def create_sharded(cfg: ModelConfig, mesh: Mesh, key: int | jax.Array = 0) -> X2VLM:
  """Builds the model with every parameter born in its final sharding on `mesh`.

  The constructor runs inside one `jax.jit` whose out_shardings come from the logical names
  (`sharding.state_shardings`), so no device ever holds a whole unsharded copy.
  key: an int seed or a PRNG key; its implementation decides the init generator (e.g.
  `jax.random.key(0, impl='unsafe_rbg')` compiles much faster on CPU than threefry).
  """
  graphdef, abstract_state = nnx.split(abstract_model(cfg))
  shardings = sharding.state_shardings(abstract_state, mesh)
  key = jax.random.key(key) if isinstance(key, int) else key

  def init(k):
    return nnx.state(X2VLM(cfg, rngs=nnx.Rngs(params=k)))

  state = jax.jit(init, out_shardings=shardings)(key)
  return nnx.merge(graphdef, state)
