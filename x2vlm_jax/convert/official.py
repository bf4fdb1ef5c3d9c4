"""Official X2-VLM state dicts <-> our nested param dict (docs/architecture.md).

Three pieces, all pure NumPy (the official key list itself is `official_spec`):
- `param_shapes(cfg)`: our side, the nested {path: (shape, dtype)} of docs/architecture.md.
- `official_rules(cfg)`: the `common.Rule` table between official keys and our paths
  (docs/conversion.md#key-mapping); it accepts the pre-training layout (`text_encoder.bert.*`,
  `text_encoder.cls.*`), the fine-tuning layout (no `bert.`, no MLM head;
  docs/fidelity.md#fine-tuning-layout) and `roberta.` in place of `bert.`.
- `official_to_params` / `params_to_official`: strict conversion both ways, with tied weights
  and buffers checked on import and re-created on export.

Official text layers [0, text.depth) are our `text.layers`, the next fusion.depth layers are our
`fusion.layers` (the official model keeps one 18-layer BERT,
docs/fidelity.md#text-and-fusion-towers). Official behaviour of the checkpoints:
docs/fidelity.md#checkpoints-and-conversion.
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
from x2vlm_jax.models.config import FusionConfig, ModelConfig, TextConfig, VisionConfig

# ---------------------------------------------------------------------------------------------
# Our parameter shapes (the table of docs/architecture.md).
# ---------------------------------------------------------------------------------------------


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """Nested {path: (shape, dtype)} of our parameters for `cfg`, per docs/architecture.md.

  Stacked towers carry a leading layer axis. tests/test_convert_official.py checks this table
  against `nnx.eval_shape` of the real model.
  """
  dw = cfg.text.width
  sh = _Shapes(np.dtype(cfg.param_dtype))
  tree = {
    "vision": _vision_shapes(sh, cfg.vision),
    "text": _text_shapes(sh, cfg.text),
    "fusion": _fusion_shapes(sh, cfg),
    "vision_proj": sh.dense((), cfg.vision.width, cfg.embed_dim),
    "text_proj": sh.dense((), dw, cfg.embed_dim),
    "temp": sh.s(),
    "itm_head": {
      "fc1": sh.dense((), dw, 2 * dw),
      "norm": sh.norm((), 2 * dw),
      "fc2": sh.dense((), 2 * dw, 2),
    },
    "box_head": {
      "fc1": sh.dense((), dw, 2 * dw),
      "norm": sh.norm((), 2 * dw),
      "fc2": sh.dense((), 2 * dw, 4),
    },
    "mlm_head": {
      "dense": sh.dense((), dw, dw),
      "norm": sh.norm((), dw),
      "bias": sh.s(cfg.text.vocab_size),
    },
  }
  if cfg.frame_len > 0:
    tree["frame_embed"] = sh.s(cfg.frame_len, cfg.vision.width)
  return tree


@dataclasses.dataclass(frozen=True)
class _Shapes:
  """(shape, dtype) leaves of one dtype, and the sub-trees our layers are made of; `n` is the
  leading (stacked layer) shape, () for an unstacked layer."""

  dtype: np.dtype

  def s(self, *shape):
    return (tuple(shape), self.dtype)

  def norm(self, n, d):
    return {"scale": self.s(*n, d), "bias": self.s(*n, d)}

  def dense(self, n, i, o):
    return {"kernel": self.s(*n, i, o), "bias": self.s(*n, o)}

  def attn(self, n, heads, dh, d_q, d_kv):
    s = self.s
    return {
      "query": {"kernel": s(*n, d_q, heads, dh), "bias": s(*n, heads, dh)},
      "key": {"kernel": s(*n, d_kv, heads, dh), "bias": s(*n, heads, dh)},
      "value": {"kernel": s(*n, d_kv, heads, dh), "bias": s(*n, heads, dh)},
      "out": {"kernel": s(*n, heads, dh, d_q), "bias": s(*n, d_q)},
    }


def _vision_shapes(sh: _Shapes, v: VisionConfig) -> dict[str, Any]:
  s, norm, dense = sh.s, sh.norm, sh.dense
  dv, vh, vdh, nv = v.width, v.num_heads, v.width // v.num_heads, (v.depth,)
  return {
    "patch_embed": {"kernel": s(v.patch_size, v.patch_size, 3, dv), "bias": s(dv)},
    "cls_token": s(1, 1, dv),
    **({"pos_embed": s(1, v.num_patches + 1, dv)} if v.abs_pos_embed else {}),
    "blocks": {
      "norm1": norm(nv, dv),
      "norm2": norm(nv, dv),
      "attn": {
        "qkv": {"kernel": s(*nv, dv, 3, vh, vdh)},
        "q_bias": s(*nv, vh, vdh),
        "v_bias": s(*nv, vh, vdh),
        "rel_pos_bias": s(*nv, v.num_rel, vh),
        "proj": {"kernel": s(*nv, vh, vdh, dv), "bias": s(*nv, dv)},
      },
      "gamma_1": s(*nv, dv),
      "gamma_2": s(*nv, dv),
      "mlp": {"fc1": dense(nv, dv, v.mlp_dim), "fc2": dense(nv, v.mlp_dim, dv)},
    },
    "fc_norm": norm((), dv),
  }


def _text_shapes(sh: _Shapes, t: TextConfig) -> dict[str, Any]:
  s, norm, dense = sh.s, sh.norm, sh.dense
  dw, th, tdh, nt = t.width, t.num_heads, t.width // t.num_heads, (t.depth,)
  return {
    "embeddings": {
      "word": s(t.vocab_size, dw),
      "position": s(t.max_positions, dw),
      "token_type": s(t.type_vocab_size, dw),
      "norm": norm((), dw),
    },
    "layers": {
      "attn": sh.attn(nt, th, tdh, dw, dw),
      "attn_norm": norm(nt, dw),
      "mlp_norm": norm(nt, dw),
      "mlp": {"fc1": dense(nt, dw, t.mlp_dim), "fc2": dense(nt, t.mlp_dim, dw)},
    },
  }


def _fusion_shapes(sh: _Shapes, cfg: ModelConfig) -> dict[str, Any]:
  f, dw, dv = cfg.fusion, cfg.text.width, cfg.vision.width
  fh, fdh, nf = f.num_heads, dw // f.num_heads, (f.depth,)
  return {
    "layers": {
      "self_attn": sh.attn(nf, fh, fdh, dw, dw),
      "cross_attn": sh.attn(nf, fh, fdh, dw, dv),
      "self_norm": sh.norm(nf, dw),
      "cross_norm": sh.norm(nf, dw),
      "mlp_norm": sh.norm(nf, dw),
      "mlp": {"fc1": sh.dense(nf, dw, f.mlp_dim), "fc2": sh.dense(nf, f.mlp_dim, dw)},
    },
  }


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
  """Rules mapping official keys (pre-training or fine-tuning layout) to our paths for `cfg`."""
  return [
    C.Rule(r"absolute_frame_pos_embed", "frame_embed", FRAME_EMBED),
    C.Rule(r"temp", "temp"),
    *_vision_rules(cfg.vision),
    *_bert_rules(cfg.text, cfg.fusion),
    *_head_rules(),
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
  emb = bert + r"embeddings\."
  rules = [
    C.Rule(emb + "position_ids", None, expect=lambda m: S.position_ids(t.max_positions)),
    C.Rule(emb + r"word_embeddings\.weight", "text.embeddings.word"),
    C.Rule(emb + r"position_embeddings\.weight", "text.embeddings.position"),
    C.Rule(emb + r"token_type_embeddings\.weight", "text.embeddings.token_type"),
    *_ln_rules(emb + "LayerNorm", "text.embeddings.norm"),
  ]
  lay = bert + r"encoder\.layer\.(?P<layer>\d+)\."
  qkv = r"(?P<qkv>query|key|value)"
  for tower, off, depth, self_attn, self_norm in (
    ("text.layers", 0, t.depth, "attn", "attn_norm"),
    ("fusion.layers", t.depth, f.depth, "self_attn", "self_norm"),
  ):
    kw = {"layer_offset": off, "layer_range": (off, off + depth)}
    rules += [
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
    if tower == "fusion.layers":
      rules += [
        *_linear_rules(
          lay + r"crossattention\.self\." + qkv,
          r"fusion.layers.cross_attn.\g<qkv>",
          T.LINEAR_TO_HEADS,
          T.BIAS_TO_HEADS,
          **kw,
        ),
        *_linear_rules(
          lay + r"crossattention\.output\.dense",
          "fusion.layers.cross_attn.out",
          T.LINEAR_FROM_HEADS,
          **kw,
        ),
        *_ln_rules(lay + r"crossattention\.output\.LayerNorm", "fusion.layers.cross_norm", **kw),
      ]
  return rules


def _head_rules() -> list[C.Rule]:
  """The MLM head (its decoder tied), the two projections, the ITM and box heads."""
  mlm = r"text_encoder\.cls\.predictions\."
  rules = [
    C.Rule(mlm + "bias", "mlm_head.bias"),
    *_linear_rules(mlm + r"transform\.dense", "mlm_head.dense"),
    *_ln_rules(mlm + r"transform\.LayerNorm", "mlm_head.norm"),
    # The decoder is tied (docs/fidelity.md#tied-decoder-entries): checked on import,
    # re-written on export.
    C.Rule(mlm + r"decoder\.weight", "text.embeddings.word", tied=True),
    C.Rule(mlm + r"decoder\.bias", "mlm_head.bias", tied=True),
    *_linear_rules(r"vision_proj", "vision_proj"),
    *_linear_rules(r"text_proj", "text_proj"),
  ]
  for theirs, ours in (("itm_head", "itm_head"), ("bbox_head", "box_head")):
    rules += [
      *_linear_rules(theirs + r"\.0", f"{ours}.fc1"),
      *_ln_rules(theirs + r"\.1", f"{ours}.norm"),
      *_linear_rules(theirs + r"\.3", f"{ours}.fc2"),
    ]
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
  params: Mapping[str, Any], cfg: ModelConfig, layout: str = S.PRETRAIN
) -> "collections.OrderedDict[str, np.ndarray]":
  """Our nested params -> ordered official state dict of numpy arrays (float32 / int64).

  Buffers are recomputed for `cfg`; tied names are written as separate arrays with identical
  values (`torch_io.save_th` re-links them to shared storage). The fine-tuning layout omits the
  MLM head, so `mlm_head.*` is not written there.
  """
  params = to_numpy_tree(params)
  spec = S.official_state_spec(cfg, layout)
  out = C.export(
    params,
    official_rules(cfg),
    spec.keys(),
    allow_unused=(layout == S.FINETUNE),
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
