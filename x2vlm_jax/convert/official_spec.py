"""What an official X2-VLM state dict holds: its layouts, keys, shapes, buffers.

- `official_state_spec(cfg, layout)`: every entry of the official state dict for a config --
  key, PyTorch shape and dtype, in the order `torch.save` writes them -- including the int64
  buffers and both tied names (`TIED`).
- `relative_position_index` / `position_ids`: the buffers, recomputed, never learned.
- `count_parameters`, `detect_layout`: the learned size of a spec, and which layout a key set is.

Official behaviour: docs/fidelity.md#official-key-list (keys and file order),
docs/fidelity.md#buffers, docs/fidelity.md#fine-tuning-layout. The mapping between these keys
and our parameter paths is `official.official_rules`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from x2vlm_jax.models.config import ModelConfig, VisionConfig

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)

PRETRAIN = "pretrain"
FINETUNE = "finetune"
# The XVLMPlus layout of the multilingual model (`official_plus.py`,
# docs/multilingual.md#layout): separate `text_encoder.*` / `cross_encoder.*`, `mlm_head.*`.
PLUS_PRETRAIN = "plus_pretrain"
PLUS_FINETUNE = "plus_finetune"
LAYOUTS = (PRETRAIN, FINETUNE, PLUS_PRETRAIN, PLUS_FINETUNE)

# Tied entries of the pre-training layout: duplicate name -> primary name
# (docs/fidelity.md#tied-decoder-entries).
TIED = {
  "text_encoder.cls.predictions.decoder.weight": "text_encoder.bert.embeddings.word_embeddings.weight",  # noqa: E501
  "text_encoder.cls.predictions.decoder.bias": "text_encoder.cls.predictions.bias",
  # The VQA answer decoder's own LM head, tied to its own embeddings.
  "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",  # noqa: E501
  "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
  # XVLMPlus `mlm_head`: only the bias is tied; its decoder weight is its own parameter.
  "mlm_head.predictions.decoder.bias": "mlm_head.predictions.bias",
}


# ---------------------------------------------------------------------------------------------
# Buffers (docs/fidelity.md#buffers): recomputed, never learned.
# ---------------------------------------------------------------------------------------------


def relative_position_index(grid: int) -> np.ndarray:
  """BEiT's (1+T, 1+T) int64 index into the rel-pos table for a grid of P x P patches.

  Patch pairs index (dr + P - 1) * (2P - 1) + (dc + P - 1) with (row, col) = divmod(tok - 1, P);
  the three last table rows serve CLS->patch, patch->CLS and CLS->CLS
  (docs/fidelity.md#relative-position-bias).
  """
  p = grid
  num_rel = (2 * p - 1) ** 2 + 3
  rows, cols = np.divmod(np.arange(p * p), p)  # [T]
  dr = rows[:, None] - rows[None, :] + p - 1  # [T, T]
  dc = cols[:, None] - cols[None, :] + p - 1
  index = np.empty((p * p + 1, p * p + 1), np.int64)
  index[1:, 1:] = dr * (2 * p - 1) + dc
  index[0, 1:] = num_rel - 3
  index[1:, 0] = num_rel - 2
  index[0, 0] = num_rel - 1
  return index


def position_ids(max_positions: int) -> np.ndarray:
  """BERT's `position_ids` buffer: arange as a (1, max_positions) int64 row."""
  return np.arange(max_positions, dtype=np.int64)[None, :]


# ---------------------------------------------------------------------------------------------
# The official key list (docs/fidelity.md#official-key-list), in file order.
# ---------------------------------------------------------------------------------------------


def _bert_prefix(layout: str) -> tuple[str, str]:
  """(prefix of BERT keys, prefix of MLM-head keys or '' when the layout has none)."""
  if layout == PRETRAIN:
    return "text_encoder.bert.", "text_encoder.cls."
  if layout == FINETUNE:
    return "text_encoder.", ""
  raise ValueError(f"unknown official layout {layout!r}; expected one of {LAYOUTS}")


def official_state_spec(
  cfg: ModelConfig, layout: str = PRETRAIN
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Ordered {official key: (PyTorch shape, dtype)} of every state-dict entry for `cfg`.

  Order follows `nn.Module.state_dict()` of the official `XVLM`
  (docs/fidelity.md#official-key-list): own parameters, then own buffers, then sub-modules. The
  fine-tuning layout (docs/fidelity.md#fine-tuning-layout) drops `bert.` and the MLM head and
  keeps the same heads (a task model may hold fewer; extra ones are reported as unexpected by
  the loader).
  """
  if layout in (PLUS_PRETRAIN, PLUS_FINETUNE):
    from x2vlm_jax.convert import official_plus  # pylint: disable=g-import-not-at-top

    return official_plus.plus_state_spec(cfg, layout)
  v = cfg.vision
  bert, cls = _bert_prefix(layout)
  spec: dict[str, tuple[tuple[int, ...], np.dtype]] = collections.OrderedDict()

  def add(key, shape, dtype=F32):
    spec[key] = (tuple(shape), np.dtype(dtype))

  if cfg.frame_len > 0:  # registered before `temp` (docs/fidelity.md#official-key-list)
    add("absolute_frame_pos_embed", (1, cfg.frame_len, 1, v.width))
  add("temp", ())
  vision_spec(add, v)
  _bert_spec(add, cfg, bert, cls)
  heads_spec(add, cfg)
  task_heads_spec(add, cfg)
  return spec


def task_heads_spec(add: Callable[..., None], cfg: ModelConfig) -> None:
  """The fine-tuning heads a task model adds (docs/finetuning.md): the VQA answer decoder
  `text_decoder.*` (a BERT LM-head model, cross-attention to text-width question states in
  every layer) and `cls_head.*` (build_mlp(cls_inputs * D, labels))."""
  dt = cfg.text.width
  if cfg.decoder_layers > 0:
    dec = cfg.replace(
      text=dataclasses.replace(cfg.text, depth=0),
      fusion=dataclasses.replace(cfg.fusion, depth=cfg.decoder_layers),
      vision=dataclasses.replace(cfg.vision, width=dt),
    )
    _bert_spec(add, dec, "text_decoder.bert.", "text_decoder.cls.")
  if cfg.cls_labels > 0:
    di = cfg.cls_inputs * dt
    add("cls_head.0.weight", (2 * di, di))
    add("cls_head.0.bias", (2 * di,))
    add("cls_head.1.weight", (2 * di,))
    add("cls_head.1.bias", (2 * di,))
    add("cls_head.3.weight", (cfg.cls_labels, 2 * di))
    add("cls_head.3.bias", (cfg.cls_labels,))


def vision_spec(add: Callable[..., None], v: VisionConfig) -> None:
  """The BEiT-2 vision encoder's entries."""
  dv = v.width
  add("vision_encoder.cls_token", (1, 1, dv))
  if v.abs_pos_embed:  # BEiT's optional absolute position embedding (`use_abs_pos_emb`)
    add("vision_encoder.pos_embed", (1, v.num_patches + 1, dv))
  add("vision_encoder.patch_embed.proj.weight", (dv, 3, v.patch_size, v.patch_size))
  add("vision_encoder.patch_embed.proj.bias", (dv,))
  tokens = v.num_patches + 1
  for i in range(v.depth):
    b = f"vision_encoder.blocks.{i}."
    add(b + "gamma_1", (dv,))
    add(b + "gamma_2", (dv,))
    add(b + "norm1.weight", (dv,))
    add(b + "norm1.bias", (dv,))
    add(b + "attn.q_bias", (dv,))
    add(b + "attn.v_bias", (dv,))
    add(b + "attn.relative_position_bias_table", (v.num_rel, v.num_heads))
    add(b + "attn.relative_position_index", (tokens, tokens), I64)
    add(b + "attn.qkv.weight", (3 * dv, dv))
    add(b + "attn.proj.weight", (dv, dv))
    add(b + "attn.proj.bias", (dv,))
    add(b + "norm2.weight", (dv,))
    add(b + "norm2.bias", (dv,))
    add(b + "mlp.fc1.weight", (v.mlp_dim, dv))
    add(b + "mlp.fc1.bias", (v.mlp_dim,))
    add(b + "mlp.fc2.weight", (dv, v.mlp_dim))
    add(b + "mlp.fc2.bias", (dv,))
  add("vision_encoder.fc_norm.weight", (dv,))
  add("vision_encoder.fc_norm.bias", (dv,))


def _bert_spec(add: Callable[..., None], cfg: ModelConfig, bert: str, cls: str) -> None:
  """The one BERT's entries (text layers, then fusion layers), then its MLM head if `cls`."""
  t, f = cfg.text, cfg.fusion
  dv, dt = cfg.vision.width, t.width
  e = bert + "embeddings."
  add(e + "position_ids", (1, t.max_positions), I64)
  add(e + "word_embeddings.weight", (t.vocab_size, dt))
  add(e + "position_embeddings.weight", (t.max_positions, dt))
  add(e + "token_type_embeddings.weight", (t.type_vocab_size, dt))
  add(e + "LayerNorm.weight", (dt,))
  add(e + "LayerNorm.bias", (dt,))
  for layer in range(t.depth + f.depth):
    fusion = layer >= t.depth
    layer_spec(
      add, f"{bert}encoder.layer.{layer}.", dt, dv, f.mlp_dim if fusion else t.mlp_dim, fusion
    )
  if cls:
    p = cls + "predictions."
    add(p + "bias", (t.vocab_size,))  # own parameter of the LM head: listed before sub-modules
    add(p + "transform.dense.weight", (dt, dt))
    add(p + "transform.dense.bias", (dt,))
    add(p + "transform.LayerNorm.weight", (dt,))
    add(p + "transform.LayerNorm.bias", (dt,))
    add(p + "decoder.weight", (t.vocab_size, dt))  # tied to the word embeddings
    add(p + "decoder.bias", (t.vocab_size,))  # tied to predictions.bias


def layer_spec(add: Callable[..., None], b: str, dt: int, dv: int, mlp: int, cross: bool) -> None:
  """One official BERT / RoBERTa layer at key prefix `b` (width dt, FFN mlp); with `cross`, its
  cross-attention to dv-wide keys/values."""
  for name in ("query", "key", "value"):
    add(b + f"attention.self.{name}.weight", (dt, dt))
    add(b + f"attention.self.{name}.bias", (dt,))
  add(b + "attention.output.dense.weight", (dt, dt))
  add(b + "attention.output.dense.bias", (dt,))
  add(b + "attention.output.LayerNorm.weight", (dt,))
  add(b + "attention.output.LayerNorm.bias", (dt,))
  if cross:
    add(b + "crossattention.self.query.weight", (dt, dt))
    add(b + "crossattention.self.query.bias", (dt,))
    for name in ("key", "value"):
      add(b + f"crossattention.self.{name}.weight", (dt, dv))
      add(b + f"crossattention.self.{name}.bias", (dt,))
    add(b + "crossattention.output.dense.weight", (dt, dt))
    add(b + "crossattention.output.dense.bias", (dt,))
    add(b + "crossattention.output.LayerNorm.weight", (dt,))
    add(b + "crossattention.output.LayerNorm.bias", (dt,))
  add(b + "intermediate.dense.weight", (mlp, dt))
  add(b + "intermediate.dense.bias", (mlp,))
  add(b + "output.dense.weight", (dt, mlp))
  add(b + "output.dense.bias", (dt,))
  add(b + "output.LayerNorm.weight", (dt,))
  add(b + "output.LayerNorm.bias", (dt,))


def heads_spec(add: Callable[..., None], cfg: ModelConfig) -> None:
  """The two projections and the ITM / box heads."""
  dv, dt = cfg.vision.width, cfg.text.width
  add("vision_proj.weight", (cfg.embed_dim, dv))
  add("vision_proj.bias", (cfg.embed_dim,))
  add("text_proj.weight", (cfg.embed_dim, dt))
  add("text_proj.bias", (cfg.embed_dim,))
  for head, out in (("itm_head", 2), ("bbox_head", 4)):
    add(f"{head}.0.weight", (2 * dt, dt))
    add(f"{head}.0.bias", (2 * dt,))
    add(f"{head}.1.weight", (2 * dt,))
    add(f"{head}.1.bias", (2 * dt,))
    add(f"{head}.3.weight", (out, 2 * dt))
    add(f"{head}.3.bias", (out,))


def count_parameters(spec: Mapping[str, tuple[tuple[int, ...], Any]]) -> int:
  """Learned scalars in a spec: excludes int64 buffers and the tied duplicate names."""
  total = 0
  for key, (shape, dtype) in spec.items():
    if np.dtype(dtype) == I64 or key in TIED:
      continue
    total += int(np.prod(shape, dtype=np.int64))
  return total


def detect_layout(keys: Iterable[str]) -> str:
  """'plus_pretrain' / 'plus_finetune' for the XVLMPlus layout (a `cross_encoder.*`; with or
  without `mlm_head.*`), else 'pretrain' if BERT keys carry `bert.` (masked-LM wrapper),
  'finetune' otherwise.

  See docs/fidelity.md#fine-tuning-layout.
  """
  keys = list(keys)
  if any(k.startswith("cross_encoder.") for k in keys):
    return PLUS_PRETRAIN if any(k.startswith("mlm_head.") for k in keys) else PLUS_FINETUNE
  if any(k.startswith("text_encoder.bert.") for k in keys):
    return PRETRAIN
  if any(k.startswith("text_encoder.") for k in keys):
    return FINETUNE
  raise ValueError("not an X2-VLM state dict: no key starts with 'text_encoder.'")
