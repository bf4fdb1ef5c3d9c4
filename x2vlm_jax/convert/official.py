"""Official X2-VLM state dicts <-> our nested param dict (docs/architecture.md).

Three pieces, all pure NumPy (the official key list itself is `official_spec`):
- `param_shapes(cfg)`: our side, the nested {path: (shape, dtype)} of docs/architecture.md
  (`param_shapes.py`, re-exported here).
- `official_rules(cfg)`: the `common.Rule` table between official keys and our paths
  (docs/conversion.md#key-mapping); it accepts the pre-training layout (`text_encoder.bert.*`,
  `text_encoder.cls.*`), the fine-tuning layout (no `bert.`, no MLM head;
  docs/fidelity.md#fine-tuning-layout) and `roberta.` in place of `bert.`.
- `official_to_params` / `params_to_official`: strict conversion both ways, with tied weights
  and buffers checked on import and re-created on export.

Official text layers [0, text.depth) are our `text.layers`, the next fusion.depth layers are our
`fusion.layers` (the official model keeps one 18-layer BERT,
docs/fidelity.md#text-and-fusion-towers). Official behaviour of the checkpoints:
docs/fidelity.md#checkpoints-and-conversion. The fine-tuning heads (`text_decoder.*`,
`cls_head.*`) have rules only when the config has them.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from x2vlm_jax import treepath
from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.convert import transforms as T
from x2vlm_jax.convert.arrays import to_numpy, to_numpy_tree
from x2vlm_jax.convert.param_shapes import param_shapes
from x2vlm_jax.models.config import FusionConfig, ModelConfig, TextConfig, VisionConfig

# ---------------------------------------------------------------------------------------------
# The rule table (docs/conversion.md#key-mapping).
# ---------------------------------------------------------------------------------------------

FRAME_EMBED = T.reshape_transform("frame_embed", lambda s: (1, s[0], 1, s[1]))
_LN = {"weight": "scale", "bias": "bias"}


def _ln_rules(foreign: str, ours: str, **kw) -> list[C.Rule]:
  return [C.Rule(foreign + r"\." + k, f"{ours}.{v}", **kw) for k, v in _LN.items()]


def _linear_rules(foreign: str, ours: str, kernel=T.LINEAR, bias=T.IDENTITY, **kw) -> list[C.Rule]:
  return [
    C.Rule(foreign + r"\.weight", ours + ".kernel", kernel, **kw),
    C.Rule(foreign + r"\.bias", ours + ".bias", bias, **kw),
  ]


def official_rules(cfg: ModelConfig) -> list[C.Rule]:
  """Rules mapping official keys (pre-training or fine-tuning layout) to our paths for `cfg`;
  the XVLMPlus layout's (`official_plus.py`) when `cfg.xvlm_plus`."""
  if cfg.xvlm_plus:
    from x2vlm_jax.convert import official_plus  # pylint: disable=g-import-not-at-top

    return official_plus.plus_rules(cfg)
  return [
    C.Rule(r"absolute_frame_pos_embed", "frame_embed", FRAME_EMBED),
    C.Rule(r"temp", "temp"),
    *_vision_rules(cfg.vision),
    *_bert_rules(cfg.text, cfg.fusion),
    *_head_rules(),
    *(_decoder_rules(cfg) if cfg.decoder_layers > 0 else []),
    *(_mlp_head_rules("cls_head", "cls_head") if cfg.cls_labels > 0 else []),
  ]


def _vision_rules(v: VisionConfig) -> list[C.Rule]:
  """The vision encoder's own entries, then its blocks (one stack in our tree)."""
  grid = v.grid
  rules: list[C.Rule] = [
    C.Rule(r"vision_encoder\.cls_token", "vision.cls_token"),
    C.Rule(r"vision_encoder\.pos_embed", "vision.pos_embed"),
    *_linear_rules(r"vision_encoder\.patch_embed\.proj", "vision.patch_embed", T.CONV_OIHW),
    *_ln_rules(r"vision_encoder\.fc_norm", "vision.fc_norm"),
  ]
  blk = r"vision_encoder\.blocks\.(?P<layer>\d+)\."
  rng = {"layer_range": (0, v.depth)}
  rules += [
    C.Rule(blk + r"gamma_(?P<g>[12])", r"vision.blocks.gamma_\g<g>", **rng),
    *_ln_rules(blk + r"norm(?P<n>[12])", r"vision.blocks.norm\g<n>", **rng),
    C.Rule(
      blk + r"attn\.(?P<b>[qv])_bias", r"vision.blocks.attn.\g<b>_bias", T.BIAS_TO_HEADS, **rng
    ),
    C.Rule(blk + r"attn\.relative_position_bias_table", "vision.blocks.attn.rel_pos_bias", **rng),
    C.Rule(
      blk + r"attn\.relative_position_index",
      None,
      expect=lambda m: S.relative_position_index(grid),
      **rng,
    ),
    C.Rule(blk + r"attn\.qkv\.weight", "vision.blocks.attn.qkv.kernel", T.FUSED_QKV, **rng),
    *_linear_rules(blk + r"attn\.proj", "vision.blocks.attn.proj", T.LINEAR_FROM_HEADS, **rng),
    *_linear_rules(blk + r"mlp\.fc(?P<fc>[12])", r"vision.blocks.mlp.fc\g<fc>", **rng),
  ]
  return rules


def _bert_rules(t: TextConfig, f: FusionConfig) -> list[C.Rule]:
  """The one official BERT: embeddings, then its layers split into our text and fusion stacks.

  Keys with `bert.`, `roberta.` or neither (the official fine-tuning loader strips both)."""
  bert = r"text_encoder\.(?:bert\.|roberta\.)?"
  rules = _embedding_rules(bert + r"embeddings\.", "text.embeddings", t.max_positions)
  lay = bert + r"encoder\.layer\.(?P<layer>\d+)\."
  rules += _layer_rules(lay, "text.layers", "attn", "attn_norm", 0, t.depth, cross=False)
  rules += _layer_rules(lay, "fusion.layers", "self_attn", "self_norm", t.depth, f.depth)
  return rules


def _layer_rules(
  lay: str, tower: str, self_attn: str, self_norm: str, off: int, depth: int, cross: bool = True
) -> list[C.Rule]:
  """One stack of official BERT layers `lay` (foreign numbers [off, off + depth)) -> our
  stacked `tower`; with `cross`, the cross-attention of every layer too."""
  kw = {"layer_offset": off, "layer_range": (off, off + depth)}
  qkv = r"(?P<qkv>query|key|value)"
  rules = [
    *_linear_rules(
      lay + r"attention\.self\." + qkv,
      rf"{tower}.{self_attn}.\g<qkv>",
      T.LINEAR_TO_HEADS,
      T.BIAS_TO_HEADS,
      **kw,
    ),
    *_linear_rules(
      lay + r"attention\.output\.dense", f"{tower}.{self_attn}.out", T.LINEAR_FROM_HEADS, **kw
    ),
    *_ln_rules(lay + r"attention\.output\.LayerNorm", f"{tower}.{self_norm}", **kw),
    *_linear_rules(lay + r"intermediate\.dense", f"{tower}.mlp.fc1", **kw),
    *_linear_rules(lay + r"output\.dense", f"{tower}.mlp.fc2", **kw),
    *_ln_rules(lay + r"output\.LayerNorm", f"{tower}.mlp_norm", **kw),
  ]
  if cross:
    rules += [
      *_linear_rules(
        lay + r"crossattention\.self\." + qkv,
        rf"{tower}.cross_attn.\g<qkv>",
        T.LINEAR_TO_HEADS,
        T.BIAS_TO_HEADS,
        **kw,
      ),
      *_linear_rules(
        lay + r"crossattention\.output\.dense", f"{tower}.cross_attn.out", T.LINEAR_FROM_HEADS, **kw
      ),
      *_ln_rules(lay + r"crossattention\.output\.LayerNorm", f"{tower}.cross_norm", **kw),
    ]
  return rules


def _decoder_rules(cfg: ModelConfig) -> list[C.Rule]:
  """The VQA answer decoder (`text_decoder.bert.*`, `text_decoder.cls.*`, a BERT LM-head model
  with cross-attention in every layer) -> our `text_decoder`."""
  dec = r"text_decoder\.bert\."
  return [
    *_embedding_rules(dec + r"embeddings\.", "text_decoder.embeddings", cfg.text.max_positions),
    *_layer_rules(
      dec + r"encoder\.layer\.(?P<layer>\d+)\.",
      "text_decoder.layers",
      "self_attn",
      "self_norm",
      0,
      cfg.decoder_layers,
    ),
    *_mlm_rules(r"text_decoder\.cls\.predictions\.", "text_decoder."),
  ]


def _embedding_rules(emb: str, ours: str, max_positions: int) -> list[C.Rule]:
  """BERT embeddings `emb*` -> our TextEmbeddings `ours`; `position_ids` is a checked buffer."""
  return [
    C.Rule(emb + "position_ids", None, expect=lambda m: S.position_ids(max_positions)),
    C.Rule(emb + r"word_embeddings\.weight", f"{ours}.word"),
    C.Rule(emb + r"position_embeddings\.weight", f"{ours}.position"),
    C.Rule(emb + r"token_type_embeddings\.weight", f"{ours}.token_type"),
    *_ln_rules(emb + "LayerNorm", f"{ours}.norm"),
  ]


def _mlm_rules(mlm: str, scope: str) -> list[C.Rule]:
  """A BERT MLM head `mlm*` -> our `<scope>mlm_head`; its decoder is tied to the word
  embeddings of the same scope (docs/fidelity.md#tied-decoder-entries): checked on import,
  re-written on export."""
  word = f"{scope}embeddings.word" if scope else "text.embeddings.word"
  return [
    C.Rule(mlm + "bias", f"{scope}mlm_head.bias"),
    *_linear_rules(mlm + r"transform\.dense", f"{scope}mlm_head.dense"),
    *_ln_rules(mlm + r"transform\.LayerNorm", f"{scope}mlm_head.norm"),
    C.Rule(mlm + r"decoder\.weight", word, tied=True),
    C.Rule(mlm + r"decoder\.bias", f"{scope}mlm_head.bias", tied=True),
  ]


def _mlp_head_rules(theirs: str, ours: str) -> list[C.Rule]:
  """`build_mlp` (Linear, LayerNorm, GELU, Linear: indices 0, 1, 3) -> our MlpHead."""
  return [
    *_linear_rules(theirs + r"\.0", f"{ours}.fc1"),
    *_ln_rules(theirs + r"\.1", f"{ours}.norm"),
    *_linear_rules(theirs + r"\.3", f"{ours}.fc2"),
  ]


def _head_rules() -> list[C.Rule]:
  """The MLM head (its decoder tied), the two projections, the ITM and box heads."""
  rules = [
    *_mlm_rules(r"text_encoder\.cls\.predictions\.", ""),
    *_linear_rules(r"vision_proj", "vision_proj"),
    *_linear_rules(r"text_proj", "text_proj"),
  ]
  for theirs, ours in (("itm_head", "itm_head"), ("bbox_head", "box_head")):
    rules += _mlp_head_rules(theirs, ours)
  return rules


# ---------------------------------------------------------------------------------------------
# Conversion both ways.
# ---------------------------------------------------------------------------------------------


def official_to_params(
  state_dict: Mapping[str, Any],
  cfg: ModelConfig,
  strict: bool = True,
  *,
  allow: Iterable[str] = (),
  source_image_size: int | None = None,
  init: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], C.CoverageReport]:
  """Official state dict (numpy or torch values) -> (our nested numpy params, coverage report).

  strict: raise `common.ConversionError` on any mismatch not in `allow` (kinds: missing,
    unexpected, shape, check). `strict=False` allows every kind and only reports.
  source_image_size: resolution the checkpoint was trained at, if different from
    `cfg.vision.image_size`: the file is imported for that resolution (index buffers checked
    against the source grid), then each block's rel-pos table is resized by
    `adapt.adapt_params` (docs/fidelity.md#relative-position-bias-resize).
  init: concrete params used for our parameters the checkpoint lacks (see `common.merge`).
  """
  allow = set(C.MISMATCH_KINDS) if not strict else set(allow)
  sd = collections.OrderedDict((k, to_numpy(val, k)) for k, val in state_dict.items())
  src_cfg = cfg
  if source_image_size is not None and source_image_size != cfg.vision.image_size:
    if cfg.vision.abs_pos_embed:
      raise ValueError(
        "resizing a vision tower with an absolute position embedding is not "
        "supported (only the relative-position tables are resized; see "
        "docs/conversion.md#resolution-change)"
      )
    src_cfg = _source_grid_config(sd, cfg, source_image_size, allow)
    if init is not None:  # the tables' init has the target shape; they always come from the file
      init = {
        p: v for p, v in treepath.flatten_dict(init).items() if not p.endswith("rel_pos_bias")
      }
  params, report = C.merge(
    sd,
    official_rules(src_cfg),
    param_shapes(src_cfg),
    allow=allow,
    init=init,
    what="official -> jax import",
  )
  if src_cfg is not cfg:
    from x2vlm_jax.convert import adapt  # pylint: disable=g-import-not-at-top

    params, notes, _ = adapt.adapt_params(params, src_cfg, cfg)
    report.notes[:0] = notes
  return params, report


def params_to_official(
  params: Mapping[str, Any], cfg: ModelConfig, layout: str | None = None
) -> "collections.OrderedDict[str, np.ndarray]":
  """Our nested params -> ordered official state dict of numpy arrays (float32 / int64).

  layout: default 'pretrain', or 'plus_pretrain' for an XVLMPlus config (`cfg.xvlm_plus`); a
  layout of the other family raises.

  Buffers are recomputed for `cfg`; tied names are written as separate arrays with identical
  values (`torch_io.save_th` re-links them to shared storage). The fine-tuning layout omits the
  MLM head, so `mlm_head.*` is not written there.
  """
  plus = (S.PLUS_PRETRAIN, S.PLUS_FINETUNE)
  if layout is None:
    layout = S.PLUS_PRETRAIN if cfg.xvlm_plus else S.PRETRAIN
  if (layout in plus) != cfg.xvlm_plus:
    raise ValueError(
      f"layout {layout!r} does not fit a config with xvlm_plus={cfg.xvlm_plus} "
      f"(XVLMPlus layouts: {plus})"
    )
  params = to_numpy_tree(params)
  spec = S.official_state_spec(cfg, layout)
  out = C.export(
    params,
    official_rules(cfg),
    spec.keys(),
    allow_unused=layout in (S.FINETUNE, S.PLUS_FINETUNE),
    what="jax -> official export",
  )
  bad = [
    f"{k}: {out[k].shape} {out[k].dtype}, spec {s} {d}"
    for k, (s, d) in spec.items()
    if out[k].shape != s
  ]
  if bad:
    raise C.ConversionError("exported shapes differ from the official spec:\n  " + "\n  ".join(bad))
  return collections.OrderedDict((k, out[k].astype(spec[k][1], copy=False)) for k in spec)


def _source_grid_config(sd, cfg, source_image_size, allow) -> ModelConfig:
  """`cfg` at the source resolution, after checking the index buffers and table sizes against
  the source grid (a wrong source resolution is named before anything is imported)."""
  v = cfg.vision
  if source_image_size % v.patch_size:
    raise ValueError(
      f"source image size {source_image_size} is not a multiple of patch {v.patch_size}"
    )
  src_grid = source_image_size // v.patch_size
  src_index = S.relative_position_index(src_grid)
  src_rows = (2 * src_grid - 1) ** 2 + 3
  bad = [
    k
    for k, val in sd.items()
    if (
      k.endswith("attn.relative_position_index")
      and (val.shape != src_index.shape or not np.array_equal(val, src_index))
    )
    or (k.endswith("attn.relative_position_bias_table") and val.shape[:1] != (src_rows,))
  ]
  if bad and "check" not in allow:
    raise C.ConversionError(
      f"{bad[0]} (and {len(bad) - 1} more) does not fit the source grid {src_grid} "
      f"(image size {source_image_size}); wrong source resolution?"
    )
  return cfg.replace(vision=dataclasses.replace(v, image_size=source_image_size))
