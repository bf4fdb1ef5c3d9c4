"""MVPTR (docs/mvptr.md): textual, visual and cross-modal post-LN BERT stacks over one shared
word + phrase embedding table and detector region vectors, with the pre-training heads.

Forward of the official `BiBertImgModel` (reference section 2):
- text "A" = [CLS] + word pieces + phrase ids + [SEP] -> `embeddings` -> `txt_encoder`;
- vision "B" = [CLS] + tag word pieces + [SEP] (segment 1) through the same `embeddings`, then the
  regions through `img_embedding` (Linear 2054 -> D + dropout, *no* position or type embedding)
  -> `vis_encoder` over the concatenation;
- joint = [all text slots, the region slots of the visual output] (tag slots, the visual [CLS]
  included, are dropped) -> `mul_encoder`, optionally also returning the state after layer
  `phrase_layer`; `pooler` = tanh(Linear) on joint token 0.
The model computes features only; the six objectives are `x2vlm_jax.mvptr_losses`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from x2vlm_jax.models import layers as L
from x2vlm_jax.models.heads import MlmHead
from x2vlm_jax.models.mvptr_config import MvptrConfig
from x2vlm_jax.models.text import TEXT_MASK_VALUE, TextLayer


class Embeddings(nnx.Module):
  """BERT embeddings with explicit position and segment ids: word (extended table) + position +
  token type -> LayerNorm -> dropout. Shared by the text and the tag streams."""

  def __init__(self, cfg: MvptrConfig, *, rngs: nnx.Rngs):
    init, pd = L.normal(0.02), cfg.param_dtype
    self.cfg = cfg
    # The official `init_weights` (old pytorch_transformers) re-draws the whole table, [PAD] row
    # included, so unlike our X2-VLM text tower the pad row is not zeroed here.
    self.word = L.param(rngs, init, (cfg.vocab_size, cfg.width), ("vocab", "embed"), pd)
    self.position = L.param(rngs, init, (cfg.max_positions, cfg.width), ("positions", "embed"), pd)
    self.token_type = L.param(rngs, init, (cfg.type_vocab_size, cfg.width), (None, "embed"), pd)
    self.norm = L.LayerNorm(cfg.width, cfg.ln_eps, dtype=cfg.dtype, param_dtype=pd, rngs=rngs)

  def __call__(self, ids, type_ids=None, position_ids=None, key=None) -> jax.Array:
    """ids [B, L] -> [B, L, D]. Defaults as the official code: types 0, positions 0..L-1."""
    if ids.shape[1] > self.cfg.max_positions:
      raise ValueError(f"sequence length {ids.shape[1]} exceeds max_positions")
    type_ids = jnp.zeros_like(ids) if type_ids is None else type_ids
    pos = self.position[...][: ids.shape[1]][None] if position_ids is None else None
    x = jnp.take(self.word[...], ids, axis=0)
    x = x + (jnp.take(self.position[...], position_ids, axis=0) if pos is None else pos)
    x = x + jnp.take(self.token_type[...], type_ids, axis=0)
    return L.dropout(self.norm(x.astype(self.cfg.dtype)), self.cfg.dropout, key)


class Stack(nnx.Module):
  """`depth` post-LN BERT layers (our `TextLayer`, stacked and scanned); self-attention only with
  BERT's additive -10000 key mask. Official `CaptionBertEncoder` (`txt_/vis_/mul_encoder`)."""

  def __init__(self, cfg: MvptrConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.depth, self.remat = cfg.depth, cfg.remat
    self.layers = L.stacked(lambda r: TextLayer(cfg.stack(), rngs=r, **kw), cfg.depth, rngs)

  def __call__(self, x, mask, key=None, *, all_layers: bool = False):
    """x [B, S, D] (already embedded), mask [B, S] -> last hidden state [B, S, D]; with
    `all_layers`, the output of every layer [depth, B, S, D] instead (for the phrase layer)."""
    bias = L.padding_bias(mask, TEXT_MASK_VALUE)  # [B, 1, 1, S]
    keys = L.layer_keys(key, self.depth, 3)
    deterministic = key is None

    def body(layer, h, k):
      h = layer(h, bias, k, deterministic)
      return h, (h if all_layers else None)

    fn = nnx.remat(body) if self.remat else body
    scan = nnx.scan(
      fn,
      in_axes=(0, nnx.Carry, 0),
      out_axes=(nnx.Carry, 0),
      transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    last, every = scan(self.layers, x, keys)
    return every if all_layers else last


class Joint(NamedTuple):
  """Output of the cross-modal stack."""

  sequence: jax.Array  # [B, L_A + R, D] last layer
  pooled: jax.Array  # [B, D] tanh(Linear) of token 0
  phrase_state: jax.Array | None  # [B, L_A + R, D] after layer `phrase_layer` (if asked)


class MVPTR(nnx.Module):
  """Parameters as the official model class of `cfg.heads`: `bert.*` always, then the heads of
  pre-training (`cls.*`, `half_mlm.*`, `logit_scale`, optional `qa_head`) or of one fine-tuning
  class (docs/mvptr.md#fine-tuning); see docs/mvptr.md for the name mapping."""

  def __init__(self, cfg: MvptrConfig, *, rngs: nnx.Rngs):
    d, kw = cfg.width, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    bert = L.normal(0.02)  # the official init_weights: N(0, 0.02) for every Linear, bias 0
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.img_embedding = L.Dense(
      (cfg.region_dim,), (d,), kernel_names=(None, "embed"), bias_names=("embed",),
      kernel_init=bert, **kw,
    )  # fmt: skip
    self.txt_encoder = Stack(cfg, rngs=rngs)
    self.vis_encoder = Stack(cfg, rngs=rngs)
    self.mul_encoder = Stack(cfg, rngs=rngs)
    self.pooler = L.Dense(
      (d,), (d,), kernel_names=("embed", "embed"), bias_names=("embed",), kernel_init=bert, **kw
    )
    # Bare D x D VSC projections (no bias), N(0, 1) / sqrt(D) as the official `txt_proj`.
    proj = L.normal(d**-0.5)
    self.txt_proj = L.param(rngs, proj, (d, d), ("embed", "proj"), cfg.param_dtype)
    self.vis_proj = L.param(rngs, proj, (d, d), ("embed", "proj"), cfg.param_dtype)
    if cfg.heads in ("pretrain", "retrieval"):
      self.logit_scale = L.param(rngs, L.constant(cfg.logit_scale_init), (), (), cfg.param_dtype)
    if cfg.heads == "pretrain":
      self._pretrain_heads(cfg, kw)
    if cfg.classifier_labels:
      # The fine-tuning `classifier` Linear(D, n) on dropout(pooler) (retrieval: a *new* ITM head
      # with label 1 = match; SNLI-VE: 3 classes; grounding: 1 output, unused by its loss).
      self.classifier = _linear(d, cfg.classifier_labels, kw)
    if cfg.heads == "vqa":
      # `BertQAPredictionHead`: transform (dense, GELU, LN) -> own decoder Linear(D, answers)
      # without bias + a bias vector; initialised from the MLM head (`tasks_mvptr`).
      self.vqa_head = MlmHead(d, cfg.qa_answers, cfg.ln_eps, own_decoder=True, **kw)

  def _pretrain_heads(self, cfg: MvptrConfig, kw: dict) -> None:
    """The heads of the official pre-training class `BiBertImgForPreTraining`."""
    d = cfg.width
    self.itm_head = _linear(d, cfg.itm_classes, kw)
    # Two MLM heads, both decoding over the word rows only (`only_word_size`): words of the
    # joint output (`cls.predictions`) and tag word pieces of the visual output (`half_mlm`).
    self.mlm_head = MlmHead(d, cfg.word_vocab_size, cfg.ln_eps, **kw)
    self.tag_mlm_head = MlmHead(d, cfg.word_vocab_size, cfg.ln_eps, **kw)
    if cfg.phrase_head:
      self.phrase_mlm_head = MlmHead(d, cfg.vocab_size, cfg.ln_eps, **kw)
    if cfg.qa_answers > 0:
      self.qa_head = _linear(d, cfg.qa_answers, kw)

  # -- uni-modal stacks ------------------------------------------------------------------------

  def encode_text(self, ids, mask, type_ids=None, position_ids=None, key=None) -> jax.Array:
    """Stream A (tokens + phrase ids) [B, L_A] -> txt_encoder output [B, L_A, D]."""
    k_emb, k_enc = _split(key)
    x = self.embeddings(ids, type_ids, position_ids, k_emb)
    return self.txt_encoder(L.constrain(x, L.ACT), mask, k_enc)

  def encode_vision(self, tag_ids, tag_mask, regions, region_mask, tag_type_ids=None, key=None):
    """Stream B: tags [B, T] (segment 1 unless given) and regions [B, R, region_dim] ->
    vis_encoder output [B, T + R, D]."""
    if regions.shape[-1] != self.cfg.region_dim:
      raise ValueError(f"regions have {regions.shape[-1]} features, expected {self.cfg.region_dim}")
    k_emb, k_img, k_enc = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
    types = jnp.ones_like(tag_ids) if tag_type_ids is None else tag_type_ids
    tags = self.embeddings(tag_ids, types, None, k_emb)
    reg = L.dropout(self.img_embedding(regions.astype(self.cfg.dtype)), self.cfg.dropout, k_img)
    x = jnp.concatenate([tags, reg.astype(tags.dtype)], axis=1)
    mask = jnp.concatenate([tag_mask, region_mask], axis=1)
    return self.vis_encoder(L.constrain(x, L.ACT), mask, k_enc)

  def global_features(self, text_hidden, vision_hidden) -> tuple[jax.Array, jax.Array]:
    """L2-normalised [CLS] @ txt_proj / vis_proj -> ([B, D], [B, D]) float32 (VSC features)."""
    return self.text_global(text_hidden), self.vision_global(vision_hidden)

  def text_global(self, text_hidden) -> jax.Array:
    """The text half of `global_features`: [B, L_A, D] -> [B, D] unit float32."""
    return _normalize(
      text_hidden[:, 0].astype(jnp.float32) @ self.txt_proj[...].astype(jnp.float32)
    )

  def vision_global(self, vision_hidden) -> jax.Array:
    """The image half of `global_features`: [B, T + R, D] -> [B, D] unit float32."""
    return _normalize(
      vision_hidden[:, 0].astype(jnp.float32) @ self.vis_proj[...].astype(jnp.float32)
    )

  # -- cross-modal stack and heads -------------------------------------------------------------

  def fuse(self, text_hidden, text_mask, regions_hidden, region_mask, key=None, *, phrase=False):
    """txt_encoder output [B, L_A, D] + the *region slots* of the vis_encoder output [B, R, D]
    (callers slice off the tag slots, see `region_slots`) -> `Joint`."""
    x = jnp.concatenate([text_hidden, regions_hidden.astype(text_hidden.dtype)], axis=1)
    mask = jnp.concatenate([text_mask, region_mask], axis=1)
    out = self.mul_encoder(L.constrain(x, L.ACT), mask, key, all_layers=phrase)
    seq, mid = (out[-1], out[self.cfg.phrase_layer]) if phrase else (out, None)
    pooled = jnp.tanh(self.pooler(seq[:, 0]))
    return Joint(seq, pooled, mid)

  @staticmethod
  def region_slots(vision_hidden, num_tags: int) -> jax.Array:
    """The region part of a vis_encoder output: drops the `num_tags` tag slots (official
    `vis_encoder_outputs[:, max_tag_length:]`)."""
    return vision_hidden[:, num_tags:]

  def word_rows(self) -> jax.Array:
    """The rows of the table both MLM decoders are tied to: [word_vocab_size, D]."""
    return self.embeddings.word[...][: self.cfg.word_vocab_size]

  def mlm_logits(self, h) -> jax.Array:
    """Joint states at masked text slots [B, M, D] -> word logits [B, M, word_vocab] f32."""
    return self.mlm_head(h, self.word_rows())

  def tag_mlm_logits(self, h) -> jax.Array:
    """Visual states at masked tag slots [B, M, D] -> word-piece logits (official `half_mlm`)."""
    return self.tag_mlm_head(h, self.word_rows())

  def phrase_logits(self, h) -> jax.Array:
    """Textual states at masked phrase slots [B, M, D] -> logits over the whole table (words +
    phrases) [B, M, vocab] f32: the paper's textual MCR (needs `phrase_head`)."""
    if not self.cfg.phrase_head:
      raise ValueError("phrase_logits needs MvptrConfig(phrase_head=True)")
    return self.phrase_mlm_head(h, self.embeddings.word[...])

  def itm_logits(self, pooled) -> jax.Array:
    """Pooled joint output [B, D] -> [B, itm_classes] f32 (official label 0 = match)."""
    return self.itm_head(pooled).astype(jnp.float32)

  def classifier_logits(self, pooled) -> jax.Array:
    """Fine-tuning `classifier`: [B, D] -> [B, classifier_labels] f32 (retrieval: 1 = match)."""
    if not self.cfg.classifier_labels:
      raise ValueError(f"heads {self.cfg.heads!r} have no classifier (retrieval, ve, grounding)")
    return self.classifier(pooled).astype(jnp.float32)

  def vqa_logits(self, h) -> jax.Array:
    """VQA head on joint token-0 states [B, D] -> answer logits [B, qa_answers] f32."""
    if self.cfg.heads != "vqa":
      raise ValueError(f"vqa_logits needs MvptrConfig(heads='vqa'), got {self.cfg.heads!r}")
    return self.vqa_head(h[:, None])[:, 0]


def _linear(d: int, n: int, kw: dict) -> L.Dense:
  """Linear(D -> n) with the official N(0, 0.02) init, kernel [D, n] (embed, classes)."""
  return L.Dense(
    (d,), (n,), kernel_names=("embed", "classes"), bias_names=("classes",),
    kernel_init=L.normal(0.02), **kw,
  )  # fmt: skip


def _split(key):
  return (None, None) if key is None else tuple(jax.random.split(key))


def _normalize(x: jax.Array) -> jax.Array:
  """F.normalize(p=2, eps=1e-12)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def abstract_mvptr(cfg: MvptrConfig) -> MVPTR:
  """The model with ShapeDtypeStruct leaves (nnx.eval_shape): nothing is allocated."""
  return nnx.eval_shape(lambda: MVPTR(cfg, rngs=nnx.Rngs(0)))


def count_mvptr_params(cfg: MvptrConfig) -> int:
  """Learned parameters of the model (tied decoders are not parameters of their own)."""
  state = nnx.state(abstract_mvptr(cfg), nnx.Param)
  return sum(math.prod(v.shape) for v in jax.tree.leaves(state))
