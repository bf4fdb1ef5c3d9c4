"""The official XVLMPlus layout (multilingual X2-VLM, `cclm_x2vlm_*.th`) <-> our parameters.

Official behaviour: docs/multilingual.md#layout and #conversion. `XVLMPlusBase` keeps two
encoders: `text_encoder.*` (a RobertaModel, no pooler, no cross-attention: our `text`) and
`cross_encoder.*` (a 6-layer BertModel without embeddings, cross-attention in every layer: our
`fusion`), and its MLM head is a separate `mlm_head.*` (BertOnlyMLMHead on the text config)
whose decoder weight is its own parameter, only the decoder bias being tied to
`predictions.bias`. State-dict order: own parameters (`temp`), then the sub-modules in
registration order: vision, text, cross encoder, projections, ITM / box heads, then `mlm_head`
(created after the base constructor).

Layouts: `plus_pretrain` (the CrossViewLM pre-training model: every head incl. `mlm_head`) and
`plus_finetune` (no `mlm_head`; a task model may hold fewer heads, reported by the loader).
`official.official_to_params` / `params_to_official` dispatch here when `cfg.xvlm_plus`.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import numpy as np

from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.convert.official_config import infer_vision
from x2vlm_jax.models.config import ModelConfig


def plus_state_spec(cfg: ModelConfig, layout: str) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Ordered {official key: (PyTorch shape, dtype)} of an XVLMPlus state dict for `cfg`."""
  if layout not in (S.PLUS_PRETRAIN, S.PLUS_FINETUNE):
    raise ValueError(f"not an XVLMPlus layout: {layout!r}")
  if not cfg.xvlm_plus:
    raise ValueError(f"layout {layout!r} needs a config with xvlm_plus=True")
  t, f = cfg.text, cfg.fusion
  dv, dt = cfg.vision.width, t.width
  spec: dict[str, tuple[tuple[int, ...], Any]] = collections.OrderedDict()

  def add(key, shape, dtype=S.F32):
    spec[key] = (tuple(shape), np.dtype(dtype))

  if cfg.frame_len > 0:
    add("absolute_frame_pos_embed", (1, cfg.frame_len, 1, dv))
  add("temp", ())
  S.vision_spec(add, cfg.vision)
  e = "text_encoder.embeddings."
  add(e + "position_ids", (1, t.max_positions), S.I64)  # persistent; token_type_ids is not
  add(e + "word_embeddings.weight", (t.vocab_size, dt))
  add(e + "position_embeddings.weight", (t.max_positions, dt))
  add(e + "token_type_embeddings.weight", (t.type_vocab_size, dt))
  add(e + "LayerNorm.weight", (dt,))
  add(e + "LayerNorm.bias", (dt,))
  for i in range(t.depth):
    S.layer_spec(add, f"text_encoder.encoder.layer.{i}.", dt, dv, t.mlp_dim, cross=False)
  for i in range(f.depth):
    S.layer_spec(add, f"cross_encoder.encoder.layer.{i}.", dt, dv, f.mlp_dim, cross=True)
  S.heads_spec(add, cfg)
  if layout == S.PLUS_PRETRAIN:
    p = "mlm_head.predictions."
    add(p + "bias", (t.vocab_size,))
    add(p + "transform.dense.weight", (dt, dt))
    add(p + "transform.dense.bias", (dt,))
    add(p + "transform.LayerNorm.weight", (dt,))
    add(p + "transform.LayerNorm.bias", (dt,))
    add(p + "decoder.weight", (t.vocab_size, dt))  # untied: its own parameter
    add(p + "decoder.bias", (t.vocab_size,))  # tied to predictions.bias
  S.task_heads_spec(add, cfg)
  return spec


def plus_rules(cfg: ModelConfig) -> list[C.Rule]:
  """Rules mapping XVLMPlus keys to our paths (`text_encoder.roberta.` accepted as well)."""
  t, f = cfg.text, cfg.fusion
  text = r"text_encoder\.(?:roberta\.)?"
  mlm = r"mlm_head\.predictions\."
  rules = [
    C.Rule(r"absolute_frame_pos_embed", "frame_embed", O.FRAME_EMBED),
    C.Rule(r"temp", "temp"),
    *O._vision_rules(cfg.vision),  # noqa: SLF001 -- same package, shared rule builders
    *O._embedding_rules(text + r"embeddings\.", "text.embeddings", t.max_positions),  # noqa: SLF001
    *O._layer_rules(  # noqa: SLF001
      text + r"encoder\.layer\.(?P<layer>\d+)\.",
      "text.layers",
      "attn",
      "attn_norm",
      0,
      t.depth,
      cross=False,
    ),
    *O._layer_rules(  # noqa: SLF001
      r"cross_encoder\.encoder\.layer\.(?P<layer>\d+)\.",
      "fusion.layers",
      "self_attn",
      "self_norm",
      0,
      f.depth,
    ),
    C.Rule(mlm + "bias", "mlm_head.bias"),
    *O._linear_rules(mlm + r"transform\.dense", "mlm_head.dense"),  # noqa: SLF001
    *O._ln_rules(mlm + r"transform\.LayerNorm", "mlm_head.norm"),  # noqa: SLF001
    C.Rule(mlm + r"decoder\.weight", "mlm_head.decoder"),
    C.Rule(mlm + r"decoder\.bias", "mlm_head.bias", tied=True),
    *O._linear_rules(r"vision_proj", "vision_proj"),  # noqa: SLF001
    *O._linear_rules(r"text_proj", "text_proj"),  # noqa: SLF001
    *O._mlp_head_rules("itm_head", "itm_head"),  # noqa: SLF001
    *O._mlp_head_rules("bbox_head", "box_head"),  # noqa: SLF001
  ]
  if cfg.decoder_layers > 0:
    rules += O._decoder_rules(cfg)  # noqa: SLF001
  if cfg.cls_labels > 0:
    rules += O._mlp_head_rules("cls_head", "cls_head")  # noqa: SLF001
  return rules


def infer_plus_config(sd, ck, variant, num_heads, image_size, notes) -> tuple[ModelConfig, int]:
  """(config, the checkpoint's image size) of an XVLMPlus state dict, read off its shapes:
  text / cross-encoder depths, widths, vocabulary, positions; heads = width / 64 unless given.
  Defaults for the rest come from `variant` (xlmr_base / xlmr_large by text width)."""

  def shape(pattern):
    return next((tuple(v.shape) for k, v in sd.items() if re.fullmatch(pattern, k)), None)

  def layers(pattern):
    return {int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k))}

  text = r"text_encoder\.(?:roberta\.)?"
  word = shape(text + r"embeddings\.word_embeddings\.weight")
  if word is None:
    raise ValueError("XVLMPlus state dict without text_encoder.embeddings.word_embeddings.weight")
  if variant is None:
    variant = "xlmr_large" if word[1] == 1024 else "xlmr_base"
    notes.append(f"variant defaults: {variant} (text width {word[1]})")
  base = ModelConfig.named(variant)
  if not base.xvlm_plus:
    raise ValueError(f"variant {variant!r} is not an XVLMPlus (multilingual) model")
  vision, source_size = infer_vision(sd, ck, base.vision, image_size, notes)
  if num_heads is None and word[1] % 64:
    raise ValueError(f"text width {word[1]} is not a multiple of 64: pass the head count")
  heads = num_heads or word[1] // 64
  if num_heads is None:
    notes.append(f"text heads {heads} = width / 64 (default head dim)")
  t_layers = layers(text + r"encoder\.layer\.(\d+)\..*")
  c_layers = layers(r"cross_encoder\.encoder\.layer\.(\d+)\..*")
  inter = shape(text + r"encoder\.layer\.0\.intermediate\.dense\.weight")
  c_inter = shape(r"cross_encoder\.encoder\.layer\.0\.intermediate\.dense\.weight")
  pos = shape(text + r"embeddings\.position_embeddings\.weight")
  ttype = shape(text + r"embeddings\.token_type_embeddings\.weight")
  tkw = dict(vocab_size=word[0], width=word[1], num_heads=heads)
  tkw.update(depth=max(t_layers) + 1 if t_layers else base.text.depth)
  tkw.update(mlp_dim=inter[0] if inter else base.text.mlp_dim)
  tkw.update(max_positions=pos[0] if pos else base.text.max_positions)
  tkw.update(type_vocab_size=ttype[0] if ttype else base.text.type_vocab_size)
  fkw = dict(depth=max(c_layers) + 1 if c_layers else base.fusion.depth, num_heads=heads)
  fkw.update(mlp_dim=c_inter[0] if c_inter else base.fusion.mlp_dim)
  proj = sd.get("vision_proj.weight")
  frames = sd.get("absolute_frame_pos_embed")
  cfg = dataclasses.replace(
    base,
    vision=vision,
    text=dataclasses.replace(base.text, **tkw),
    fusion=dataclasses.replace(base.fusion, **fkw),
    embed_dim=proj.shape[0] if proj is not None else base.embed_dim,
    frame_len=frames.shape[1] if frames is not None else 0,
  )
  return cfg, source_size


def plus_from_english(
  english_sd, english_cfg: ModelConfig, xlmr_src, cfg: ModelConfig
) -> tuple[dict[str, Any], list[str]]:
  """The paper's path (docs/multilingual.md#the-papers-claim-and-the-released-checkpoints): an
  English X2-VLM state dict + HF XLM-R weights -> params of the XVLMPlus `cfg`, as the official
  `load_pretrained_xvlm(replace_text_encoder=True)` + `load_pretrained_text` build them.

  From the English file: vision, the fusion layers (official layers >= 12, the cross encoder),
  projections, temperature, ITM / box heads and the MLM head's transform (`dense`, `norm`); its
  text layers, embeddings and MLM decoder / bias are dropped. From `xlmr_src`: the text tower.
  Left out (fresh): `mlm_head.bias` and `mlm_head.decoder`. Returns (params, notes)."""
  from x2vlm_jax.convert import hf_xlmr  # pylint: disable=g-import-not-at-top

  if not cfg.xvlm_plus or english_cfg.xvlm_plus:
    raise ValueError("plus_from_english needs an English config and an XVLMPlus config")
  if english_cfg.text.width != cfg.text.width:
    raise ValueError(
      f"the English cross encoder is {english_cfg.text.width} wide but the XLM-R tower is "
      f"{cfg.text.width}: the official cross encoder must have the text width"
    )
  eng, _ = O.official_to_params(english_sd, english_cfg, allow={"missing"})
  keep = ("vision", "fusion", "vision_proj", "text_proj", "temp", "itm_head", "box_head")
  params: dict[str, Any] = {k: eng[k] for k in keep if k in eng}
  if "frame_embed" in eng and cfg.frame_len == english_cfg.frame_len > 0:
    params["frame_embed"] = eng["frame_embed"]
  if "mlm_head" in eng:
    params["mlm_head"] = {k: eng["mlm_head"][k] for k in ("dense", "norm")}
  params["text"] = hf_xlmr.load_xlmr(xlmr_src, cfg).params["text"]
  notes = [
    "English text layers, embeddings and MLM decoder dropped; text tower from XLM-R; "
    "mlm_head.bias and mlm_head.decoder fresh"
  ]
  return params, notes
