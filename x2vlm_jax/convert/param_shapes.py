"""Our side of every conversion: the nested {path: (shape, dtype)} of our parameters for a
config, per docs/architecture.md (`param_shapes`); `official.py` maps official keys onto it.

Stacked towers carry a leading layer axis. tests/test_convert_official.py checks this table
against `nnx.eval_shape` of the real model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from x2vlm_jax.models.config import ModelConfig, TextConfig, VisionConfig

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
  if cfg.decoder_layers > 0:  # the VQA answer decoder: fusion-shaped layers over text states
    dec = cfg.replace(
      vision=dataclasses.replace(cfg.vision, width=dw),
      fusion=dataclasses.replace(cfg.fusion, depth=cfg.decoder_layers),
    )
    tree["text_decoder"] = {
      "embeddings": _text_shapes(sh, cfg.text)["embeddings"],
      **_fusion_shapes(sh, dec),
      "mlm_head": dict(tree["mlm_head"]),
    }
  if cfg.xvlm_plus:  # the XVLMPlus MLM head's own decoder (docs/multilingual.md#layout)
    tree["mlm_head"]["decoder"] = sh.s(cfg.text.vocab_size, dw)
  if cfg.cls_labels > 0:
    di = cfg.cls_inputs * dw
    tree["cls_head"] = {
      "fc1": sh.dense((), di, 2 * di),
      "norm": sh.norm((), 2 * di),
      "fc2": sh.dense((), 2 * di, cfg.cls_labels),
    }
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
