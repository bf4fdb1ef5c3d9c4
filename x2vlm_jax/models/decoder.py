"""The VQA answer decoder (`text_decoder`, official `XVLMForVQA.text_decoder`, a BERT LM-head
model): its own embeddings, `decoder_layers` post-LN layers of causal self-attention ->
cross-attention to the fused *question* states -> FFN, and its own MLM head whose decoder is
tied to its own word embeddings (docs/finetuning.md#vqa-v2).

The layers are fusion layers whose cross-attention reads text-width states (keys / values
[Dt, H, dh]) and whose self-attention is causal (`FusionTower(causal=True)`), so the official
initialisation -- decoder layer k <- fusion layer k, embeddings and MLM head <- the encoder's
(`convert.adapt.decoder_from_encoder`) -- is a copy of arrays of the same shapes. Self-attention
masks with -10000, cross-attention with the fusion tower's -1e9, dropout as in the fusion
tower (only when a key is given).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.fusion import FusionTower, VisionKV
from x2vlm_jax.models.heads import MlmHead
from x2vlm_jax.models.text import TextEmbeddings


class TextDecoder(FusionTower):
  """ids [N, La] (+ mask) attending to question states [Nq, Lq, Dt] -> logits [N, La, V]."""

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, remat: bool = False, rngs):
    layer_cfg = dataclasses.replace(cfg.fusion, depth=cfg.decoder_layers, drop_path_rate=0.0)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    super().__init__(
      layer_cfg,
      cfg.text,
      cfg.text.width,
      remat=remat,
      unroll=cfg.scan_unroll,
      causal=True,
      attention=cfg.attention,
      rngs=rngs,
      **kw,
    )
    self.embeddings = TextEmbeddings(cfg.text, rngs=rngs, **kw)
    self.mlm_head = MlmHead(cfg.text.width, cfg.text.vocab_size, cfg.text.ln_eps, rngs=rngs, **kw)

  def question_kv(self, question: jax.Array) -> VisionKV:
    """Question states [Nq, Lq, Dt] -> every decoder layer's cross-attention K/V."""
    return self.vision_kv(question)

  def logits(
    self,
    ids: jax.Array,
    mask: jax.Array,
    question: jax.Array | VisionKV,
    question_mask: jax.Array,
    q_index: jax.Array | None = None,
    key: jax.Array | None = None,
  ) -> jax.Array:
    """ids, mask [N, La]; question states [Nq, Lq, Dt] or their `question_kv`; question_mask
    [N, Lq] (per answer row); q_index [N] picks each row's question (None: Nq == N) ->
    float32 next-token logits [N, La, V] (position t predicts token t + 1)."""
    k_emb, k_layers = (None, None) if key is None else tuple(jax.random.split(key))
    x = self.embeddings(ids, k_emb, mask)  # [N, La, Dt]
    h = self(x, mask, question, question_mask, q_index, k_layers)  # [N, La, Dt]
    return self.mlm_head(h, self.embeddings.word[...])


def answer_log_probs(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Teacher-forced log p of every answer token after the first: logits [N, La, V], ids and
  mask [N, La] -> [N, La - 1] (0 at padding), the official shifted LM loss negated per token
  (labels = ids with [PAD] ignored)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [N, La-1, V]
  target = ids[:, 1:].astype(jnp.int32)
  picked = jnp.take_along_axis(logp, target[:, :, None], axis=-1)[:, :, 0]
  return picked * mask[:, 1:].astype(jnp.float32)
